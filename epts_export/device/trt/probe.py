"""Is TensorRT usable here, and on which GPU: the TensorRT import (``tensorrt`` or the PyPI
bindings' ``tensorrt_bindings``), the GPU through the CUDA runtime (``device.cuda``, no torch), and
one-line errors for what cannot start.

Facts this relies on (checked against the real bindings of 8.6.1, 10.3.0 and 11.4.0.106 by the
tests): the module is ``tensorrt`` on JetPack and with NVIDIA's meta package, ``tensorrt_bindings``
when only the PyPI bindings wheel is installed; ``trt.Builder(logger)`` and ``trt.Runtime(logger)``
never return None: without a usable GPU, driver or library they raise TypeError ("factory function
returned nullptr"), which ``start`` turns into one line.
"""

from __future__ import annotations

import importlib

from ..cuda import CudaRuntime
from ..errors import UserError, one_line
from .logger import make_logger

INSTALL_HINT = "pip install 'epts-export[tensorrt]' (NVIDIA's index)"
NOT_INSTALLED = f"tensorrt is not installed: {INSTALL_HINT}; on Jetson it ships with JetPack (python3-libnvinfer)"
NO_GPU = "no CUDA GPU visible"
# the module's name on JetPack / with NVIDIA's meta package, then with the PyPI bindings wheel alone
MODULE_NAMES = ("tensorrt", "tensorrt_bindings")


def gpu() -> tuple[str, str] | None:
    """(name, compute capability "major.minor") of CUDA device 0 through libcudart; None when there
    is no libcudart or it sees no device."""
    try:
        rt = CudaRuntime.load()
        if rt.device_count() < 1:
            return None
        return rt.name(0), rt.capability(0)
    except (UserError, RuntimeError, OSError):
        return None


def compute_capability() -> str | None:
    """The compute capability of CUDA device 0 ("8.7" on Orin), or None when it cannot be told."""
    found = gpu()
    return found[1] if found else None


def _import_tensorrt():
    """The first module of MODULE_NAMES that imports. ModuleNotFoundError naming "tensorrt" when none
    is installed; a module that is installed but fails to load raises what its import raised."""
    for name in MODULE_NAMES:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name not in (None, name):
                raise  # installed, but something it needs is missing
    raise ModuleNotFoundError(f"No module named {' or '.join(MODULE_NAMES)}", name=MODULE_NAMES[0])


def _import_error(e: Exception) -> str:
    """Why TensorRT cannot be imported, and what to do, for an exception of _import_tensorrt."""
    if isinstance(e, ModuleNotFoundError):
        if e.name in (None, *MODULE_NAMES):
            return NOT_INSTALLED
        return f"tensorrt is installed but incomplete (no module {e.name}): reinstall it with {INSTALL_HINT}"
    # a broken install: bindings without their libnvinfer, wrong CUDA, ...
    return f"tensorrt is installed but does not load ({type(e).__name__}: {one_line(e)}): reinstall it with {INSTALL_HINT}"


def tensorrt_status() -> tuple[bool, str]:
    """(True, "TensorRT X.Y.Z, <GPU> (sm_XY)") when TensorRT imports and a CUDA GPU is visible, else (False, why)."""
    try:
        trt = _import_tensorrt()
    except Exception as e:
        return False, _import_error(e)
    version = getattr(trt, "__version__", "?")
    try:
        rt = CudaRuntime.load()
    except UserError:
        rt = None
    if rt is not None:
        if rt.device_count() < 1:
            return False, f"{NO_GPU} ({rt.path} sees no device; check nvidia-smi)"
        try:
            return True, f"TensorRT {version}, {rt.name(0)} (sm_{rt.capability(0).replace('.', '')})"
        except RuntimeError:
            pass  # fall through to TensorRT's own probe
    # no libcudart: ask TensorRT itself (a builder needs a CUDA device)
    try:
        start(trt, "Builder", make_logger(trt, lambda m: None))  # errors kept in its tail, not printed
    except UserError as e:  # the real bindings: TypeError from the constructor, as start words it
        return False, str(e)
    except Exception as e:
        return False, f"{NO_GPU} (TensorRT could not create a builder: {one_line(e)})"
    return True, f"TensorRT {version}, CUDA GPU (no libcudart found to name it; engines run through libcudart)"


def import_trt():
    """The TensorRT module (``tensorrt``, else ``tensorrt_bindings``); UserError saying how to
    install it when it is missing or broken."""
    try:
        return _import_tensorrt()
    except Exception as e:
        raise UserError(_import_error(e)) from None


def start(trt, kind: str, logger):
    """``trt.Builder(logger)`` or ``trt.Runtime(logger)`` (``kind`` names the class). The real
    bindings raise TypeError ("factory function returned nullptr") when TensorRT cannot start here
    (no GPU, a broken driver or library): UserError in one line instead, with TensorRT's last
    messages."""
    version = getattr(trt, "__version__", "?")
    try:
        obj = getattr(trt, kind)(logger)
        why = "it returned None"
    except TypeError as e:
        obj, why = None, one_line(e)
    if obj is None:
        said = list(getattr(logger, "tail", []))[-3:]
        raise UserError(f"TensorRT {version} could not create a {kind} ({why}): {NO_GPU}, or its driver or "
                        f"libraries are broken (check nvidia-smi)" + (f"; TensorRT said: {' | '.join(said)}" if said else ""))
    return obj
