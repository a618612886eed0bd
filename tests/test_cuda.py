"""Device memory without torch (``device.cuda``): DeviceBuffers over a host stand-in for libcudart,
and the one-line error where there is no libcudart."""

from __future__ import annotations

import numpy as np
import pytest

from epts_export.errors import UserError
from trt_runtime_fakes import HostCudart


def test_device_buffers_copy_reuse_and_free():
    """device.cuda.DeviceBuffers (what TrtDecoder uses instead of torch): arrays round-trip in every
    dtype (bfloat16 as float32 on the host, rounded to nearest even), a dropped block is reused for
    the same size without another cudaMalloc, close() frees every block once."""
    from epts_export.device.cuda import DeviceBuffers

    rt = HostCudart()
    buf = DeviceBuffers(rt, device=0)
    for dtype, host in (("float16", np.float16), ("float32", np.float32), ("int64", np.int64), ("int32", np.int32)):
        a = (np.arange(24).reshape(2, 3, 4) - 5).astype(host)
        dev = buf.to_device(a, dtype)
        assert dev.shape == a.shape and buf.ptr(dev) in rt.blocks
        np.testing.assert_array_equal(buf.to_host(dev), a)
    bf = np.array([1.0, 1.00390625, 1.005859375, -3.14159, 3.0e38], np.float32)
    back = buf.to_host(buf.to_device(bf, "bfloat16"))
    assert back.dtype == np.float32 and list(back[:4]) == [1.0, 1.0, 1.0078125, -3.140625]  # what torch's bfloat16 gives
    mallocs = sum(c[0] == "malloc" for c in rt.calls)
    x = buf.empty((4, 8), "float16")
    ptr = x.ptr
    del x
    y = buf.empty((8, 4), "float16")  # the same bytes: the freed block comes back
    assert y.ptr == ptr and sum(c[0] == "malloc" for c in rt.calls) == mallocs + (0 if mallocs else 1)
    np.testing.assert_array_equal(buf.to_host(buf.zeros((3, 3), "float32")), np.zeros((3, 3), np.float32))
    assert buf.device_name() == "Host GPU (sm_87, cuda:0)"
    held = len(rt.blocks)
    buf.close()
    assert not rt.blocks and sum(c[0] == "free" for c in rt.calls) == held and ("stream_destroy", 0x5) in rt.calls
    del y  # after close: released to nothing, freed once
    with pytest.raises(UserError, match="no CUDA GPU visible"):
        DeviceBuffers(HostCudart(devices=0))
    with pytest.raises(UserError, match="CUDA device 3 does not exist: 1 visible"):
        DeviceBuffers(HostCudart(), device=3)

def test_without_libcudart_device_memory_is_one_line(monkeypatch):
    """No CUDA runtime library anywhere (this CI machine): one UserError saying where to get it."""
    from epts_export.device import cuda

    monkeypatch.setattr(cuda, "_candidates", lambda: ["/nonexistent/libcudart.so.12"])
    with pytest.raises(UserError, match="libcudart.* was not found.*EPTS_CUDART"):
        cuda.DeviceBuffers()
