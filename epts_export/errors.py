"""The one error type for everything a user can fix (defined in ``device.errors``, which ships in
bundles; host code imports it from here)."""

from __future__ import annotations

from .device.errors import UserError

__all__ = ["UserError"]
