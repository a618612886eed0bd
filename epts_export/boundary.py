"""Where the command line meets errors: a UserError is one line and its exit code; a full disk or
another OS error while reading or writing is one line too (the staged folders were already
removed on the way out); Ctrl-C and SIGTERM stop the command the same way, so every staged folder
and temporary copy is cleaned up, and the process exits 130 or 143 with a line saying so.
EPTS_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import errno
import functools
import os

from .device.errors import interrupted_line, terminated
from .errors import UserError

def os_error_line(e: OSError) -> str:
    """One line for an OSError met while reading or writing."""
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    if e.errno == errno.ENOSPC:
        return f"no space left on the device{where}: free some space or write elsewhere; nothing was left half-written"
    if e.errno == errno.ENAMETOOLONG:
        return f"a file name is too long for the file system{where}: choose a shorter path"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied{where}: {e.strerror}"
    return f"{e.strerror or type(e).__name__}{where}"


def boundary(fn):
    """A command's errors as one styled line and an exit code (the traceback with EPTS_DEBUG=1)."""
    import typer
    from rich.markup import escape

    from .progress import console

    def fail(text: str, code: int):
        console.print(f"[red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)
        raise typer.Exit(code) from None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if os.environ.get("EPTS_DEBUG"):
                raise
            fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            if os.environ.get("EPTS_DEBUG"):
                raise
            fail(*interrupted_line())
        except OSError as e:
            if os.environ.get("EPTS_DEBUG"):
                raise
            if terminated():
                fail(*interrupted_line())
            fail(os_error_line(e), 1)
        except Exception:
            if terminated() and not os.environ.get("EPTS_DEBUG"):  # a signal inside an import comes out as ImportError
                fail(*interrupted_line())
            raise

    return wrapper
