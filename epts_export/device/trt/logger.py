"""The one TensorRT logger: forwards warnings and errors, keeps a tail for error messages and (for
the builder) every line the sparse report reads."""

from __future__ import annotations

from collections import deque
from typing import Callable


_SEVERITY_RANK = {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2, "INFO": 3, "VERBOSE": 4}
RANK_WARNING, RANK_INFO = _SEVERITY_RANK["WARNING"], _SEVERITY_RANK["INFO"]


def severity_rank(severity) -> int:
    """0 (INTERNAL_ERROR) .. 4 (VERBOSE) for a ``trt.ILogger.Severity`` (by member name: the enum's
    integer values are not promised), an int, or a name; 3 (INFO) when it cannot tell."""
    name = getattr(severity, "name", None)
    if isinstance(name, str) and name.upper() in _SEVERITY_RANK:
        return _SEVERITY_RANK[name.upper()]
    try:
        return int(severity)
    except (TypeError, ValueError):
        text = str(severity).rsplit(".", 1)[-1].upper()
        return _SEVERITY_RANK.get(text, RANK_INFO)


def make_logger(trt, log: Callable[[str], None], keep_lines: bool = False, forward_level: int = RANK_WARNING):
    """A ``trt.ILogger`` that forwards messages of rank <= ``forward_level`` (see severity_rank) to
    ``log`` as "[TensorRT] <msg>" and keeps a ``.tail`` of messages for error texts.

    ``keep_lines`` (the builder): also keep every INFO-and-above line and every "(Sparsity)" line in
    ``.lines`` (the sparse report reads them), forward "(Sparsity)" lines whatever their severity,
    and keep the last 200 kept lines as the tail. Without it (the runtime): ``.lines`` stays empty
    and the tail is the last 20 forwarded lines. A failing ``log`` never breaks TensorRT's call.
    """
    tail_len = 200 if keep_lines else 20
    base = getattr(trt, "ILogger", None)
    if base is None:  # pragma: no cover - every TensorRT 8+ has ILogger
        logger = trt.Logger(trt.Logger.WARNING)
        logger.lines, logger.tail = [], deque(maxlen=tail_len)
        return logger

    class EptsLogger(base):  # type: ignore[misc, valid-type]
        def __init__(self):
            base.__init__(self)
            self.lines: list[str] = []
            self.tail: deque[str] = deque(maxlen=tail_len)

        def log(self, severity, msg):  # called by TensorRT, possibly from its threads
            text = str(msg)
            rank = severity_rank(severity)
            sparsity = keep_lines and "(Sparsity)" in text
            forward = rank <= forward_level or sparsity
            if keep_lines and (rank <= RANK_INFO or sparsity):
                self.lines.append(text)
                self.tail.append(text)
            elif not keep_lines and forward:
                self.tail.append(text)
            if forward:
                try:
                    log(f"[TensorRT] {text}")
                except Exception:
                    pass

    return EptsLogger()


def tail(logger, n: int = 20) -> str:
    lines = list(getattr(logger, "tail", []))[-n:]
    return " | ".join(lines) if lines else "(TensorRT logged nothing)"
