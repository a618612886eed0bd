"""The one error type for everything a user can fix, and ``one_line`` for quoting an exception in
one (defined in ``device.errors``, which ships in bundles; host code imports them from here)."""

from __future__ import annotations

from .device.errors import UserError, one_line

__all__ = ["UserError", "one_line"]
