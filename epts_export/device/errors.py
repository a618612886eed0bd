"""One error type for everything a user can fix; the CLI and the bundle's scripts turn it into one
line and an exit code."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a missing path, a malformed level, a tampered artifact.

    The CLI prints ``error: <message>`` and exits with ``exit_code`` (1 by default), without a
    traceback unless ``EPTS_DEBUG`` is set. The message should say what is wrong and what to do.
    """

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def one_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of ``exc``'s message (its type's name when it has none), spaces
    collapsed, at most ``limit`` characters: what a one-line error quotes of an exception."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines[0].split()) if lines else type(exc).__name__
    return text[:limit]


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_TERMINATED = 143  # 128 + SIGTERM
_terminated: list = []
_reported: list = []  # interrupted_line() was called: the command is on its way out after Ctrl-C or SIGTERM


def _on_sigterm(signum, frame):
    _terminated.append(signum)
    raise KeyboardInterrupt  # unwinds like Ctrl-C: staged folders, temporary copies and locks are released


def install_sigterm() -> None:
    """SIGTERM unwinds the command like Ctrl-C (only from the main thread, where Python runs handlers)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def terminated() -> bool:
    """Whether SIGTERM arrived (a signal inside an import then surfaces as ImportError, not KeyboardInterrupt)."""
    return bool(_terminated)


def interrupted_line() -> tuple:
    """(the one line, the exit code) of a command stopped by Ctrl-C or SIGTERM."""
    _reported.append(True)
    if _terminated:
        return "terminated (SIGTERM): stopped, and nothing was left half-written", EXIT_TERMINATED
    return "interrupted: stopped, and nothing was left half-written", EXIT_INTERRUPTED


def interrupted() -> bool:
    """Whether the command reported an interruption (``interrupted_line``): it is on its way out."""
    return bool(_reported)


def exit_interrupted(code: int):
    """Leave with ``code`` after Ctrl-C or SIGTERM, exit handlers run and output flushed.

    A KeyboardInterrupt that passed through code an extension ran with ``PyRun_String`` (pybind11's
    ``exec`` does) leaves a flag in CPython that makes ``python -m`` exit by SIGINT (status -2)
    whatever status the program chose, even though the interruption was handled; ``os._exit``
    keeps the promised 130 or 143."""
    import atexit
    import os
    import sys

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


EXIT_INTEGRITY = 3  # a file is missing, altered or not listed; a level drifts from its reference
EXIT_DEVICE = 4  # engines built for another GPU or TensorRT than the one running here
