"""Run a TensorRT engine of a bundle (built by ``builder`` or by the bundle's trtexec script) step by
step, with OrtDecoder's interface, so that ``ort.greedy`` (and parity) drive an engine exactly as
they drive an ONNX graph.

    dec = TrtDecoder(Path("engines/level-2of4.engine"), level="2:4")
    tokens = greedy(dec.step, dec.empty_past(1), prompt, 32)

    dec = TrtDecoder(Path("engines/unstructured.engine"), level="0.3")   # one engine, levels 0.3 ... 0.7
    dec.set_level("0.7")   # refit the prunable weights the bundle's weight builder gives for 0.7
    # -> {"level": "0.7", "switched": True, "refit_s": 0.8, "weights": 210, "check": {...}}

TensorRT >= 8.5 name-based I/O (``num_io_tensors``, ``get_tensor_name``, ``get_tensor_mode``,
``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``). The engines have optimization
profiles (``prefill`` = 0, ``decode`` = 1, ``continue`` = 2 in epts-export bundles); each step runs
on the first profile whose [min, max] ranges hold every input shape.

A level is served only once one prefill matched ONNX Runtime at that level on this device
(``check_level``, after the load and after every refit): TensorRT's refit can go wrong silently
(TensorRT 11.3's release notes list a refit defect that can drop a GEMM bias), and a level whose
outputs drift is refused (exit 3), never served. Device memory is ``device.cuda``'s (libcudart
through ctypes: no torch); tests hand ``TrtDecoder`` a CPU stand-in and a fake ``tensorrt``.
Nothing imports ``tensorrt`` or touches CUDA at module level.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Callable, Tuple

import numpy as np

from ..compare import between_runtimes, step_check
from ..errors import EXIT_INTEGRITY, UserError, one_line
from ..interface import ID_INPUTS, PAST_RE, PRESENT_RE
from ..ort import positions
from .logger import make_logger
from .probe import import_trt, start, tensorrt_status
from .spec import bundle_engine
from .weights import default_levels

# TensorRT DataType member name -> our dtype name (the buffers speak these names)
_TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
               "BOOL": "bool", "INT8": "int8", "UINT8": "uint8"}
# dtype name -> numpy dtype of the host arrays (numpy has no bfloat16: such tensors travel as float32)
HOST_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.float32, "int32": np.int32,
               "int64": np.int64, "bool": np.bool_, "int8": np.int8, "uint8": np.uint8}
PROBE_TOKENS = 16  # the prefill a served level is checked with

Shape = Tuple[int, ...]  # typing.Tuple: JetPack 5 runs Python 3.8


def _dtype_name(trt_dtype) -> str:
    """Our name for a tensorrt.DataType (by member name: its integer values are not stable)."""
    name = getattr(trt_dtype, "name", None)
    if not isinstance(name, str):
        name = str(trt_dtype).rsplit(".", 1)[-1]
    name = name.upper()
    if name not in _TRT_DTYPES:
        raise UserError(f"engine tensor type {name} is not supported by this runtime "
                        f"(supported: {', '.join(sorted(_TRT_DTYPES))})")
    return _TRT_DTYPES[name]


def _dims(dims) -> Shape:
    return tuple(int(d) for d in dims)


def _volume(shape: Shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _range_text(mn: Shape, mx: Shape) -> str:
    return "[" + ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in zip(mn, mx)) + "]"


def _shape_text(shape: Shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _kv_key(name: str, pattern: re.Pattern) -> tuple[int, int]:
    m = pattern.match(name)
    assert m is not None
    return int(m.group(1)), 0 if m.group(2) == "key" else 1


def _fits(shape: Shape, mn: Shape, mx: Shape) -> bool:
    return len(shape) == len(mn) == len(mx) and all(a <= d <= b for d, a, b in zip(shape, mn, mx))


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def _default_profile_names(count: int) -> list[str]:
    if count == 3:  # what epts-export bundles build: an empty cache, one new token, several on a cache
        return ["prefill", "decode", "continue"]
    if count == 2:  # bundles before the continue profile
        return ["prefill", "decode"]
    return ["default"] if count == 1 else [f"profile{i}" for i in range(count)]


# --------------------------------------------------------------------------------------------
# the decoder


class TrtDecoder:
    """One TensorRT engine (plan file) and one execution context, with OrtDecoder's interface:
    ``empty_past(batch)``, ``step(input_ids, attention_mask, position_ids, past) -> (logits float32
    (B, S, V), presents)`` and the attributes ``past_dtype``, ``kv_heads``, ``head_dim``.

    Levels: ``levels`` are the levels the engine serves (from its bundle's engines.json; empty for
    an engine outside a bundle), ``level`` the one it serves now. ``set_level(name)`` refits a
    refittable engine to another of its levels and checks it (see the module docstring); an engine
    of a bundle runs no step before a level passed that check. ``level`` here: serve that level
    from the start (its report is ``load_switch``).

    ``weights``: where level weights and references come from (``weights.LevelWeights`` or
    ``BakedLevels``; by default the bundle's). ``device`` is the CUDA device index; ``log`` gets
    TensorRT's warnings and errors (stderr by default). ``buffers`` replaces the CUDA device memory
    (tests pass a CPU stand-in). UserError when TensorRT or a GPU is missing, or the plan does not
    load here (an engine is tied to the GPU and TensorRT version that built it).
    """

    def __init__(self, engine_path: Path, device: int = 0, log: Callable[[str], None] | None = None,
                 *, buffers=None, level: str | None = None, weights=None, threads: int | None = None):
        self.engine_path = Path(engine_path)
        self.log = log or _stderr
        if not self.engine_path.is_file():
            raise UserError(f"TensorRT engine {self.engine_path} is missing: build it first "
                            f"(bash build_engines.sh or python3 build_engines.py in the bundle)")
        ok, why = tensorrt_status()
        if not ok:
            raise UserError(f"cannot run the TensorRT engine {self.engine_path}: {why}")
        trt = import_trt()
        self.trt = trt
        self.version = str(getattr(trt, "__version__", "?"))
        self.device = int(device)
        if buffers is None:
            from ..cuda import DeviceBuffers

            buffers = DeviceBuffers(device=self.device)
        self.buffers = buffers

        self._logger = make_logger(trt, self.log)  # warnings and errors, a 20-line tail
        self.runtime = start(trt, "Runtime", self._logger)
        engine = self.runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if engine is None:
            raise UserError(f"TensorRT {self.version} cannot load {self.engine_path} ({self._tail()}): engines only "
                            f"run with the TensorRT version and GPU that built them; rebuild it here "
                            f"(build_engines.sh / build_engines.py)")
        self.engine = engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise RuntimeError(f"TensorRT {self.version} could not create an execution context for "
                               f"{self.engine_path} (out of device memory?): {self._tail()}")
        self.spec, source = bundle_engine(self.engine_path)
        self.weights = weights if weights is not None else default_levels(self.spec, source, threads)
        self.levels: list[str] = list(self.spec.levels) if self.spec else []
        self.level: str | None = self.spec.build_level if self.spec else None  # the plan holds its weights
        self.checked: dict[str, dict] = {}  # level -> the check it passed since its weights were loaded
        self.refits = 0
        self._discover_io()
        self._read_profiles()
        self._profile = 0  # a fresh context starts on profile 0
        self.profile_switches = 0
        self.load_switch = self.set_level(level) if level is not None else None

    # ---- discovery

    def _discover_io(self) -> None:
        trt, engine = self.trt, self.engine
        self.inputs: dict[str, str] = {}
        self.outputs: dict[str, str] = {}
        for i in range(int(engine.num_io_tensors)):
            name = str(engine.get_tensor_name(i))
            dtype = _dtype_name(engine.get_tensor_dtype(name))
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.inputs[name] = dtype
            else:
                self.outputs[name] = dtype
        where = f"TensorRT engine {self.engine_path}"
        unknown = [n for n in self.inputs if n not in ID_INPUTS and not PAST_RE.match(n)]
        if unknown:
            hint = " (an elastic graph: build the engine from the baked export)" if "sparsity_level" in unknown else ""
            raise UserError(f"{where} has inputs this runtime does not feed: {', '.join(unknown)}{hint}")
        for need in ("input_ids", "attention_mask"):
            if need not in self.inputs:
                raise UserError(f"{where} has no {need} input: it is not an epts-export decoder engine")
        if "logits" not in self.outputs:
            raise UserError(f"{where} has no logits output: it is not an epts-export decoder engine")
        self.past_names = sorted((n for n in self.inputs if PAST_RE.match(n)), key=lambda n: _kv_key(n, PAST_RE))
        self.present_names = sorted((n for n in self.outputs if PRESENT_RE.match(n)),
                                    key=lambda n: _kv_key(n, PRESENT_RE))
        expected = [f"present.{i}.{k}" for i in range(len(self.past_names) // 2) for k in ("key", "value")]
        if not self.past_names or self.present_names != expected or len(self.past_names) != len(expected):
            raise UserError(f"{where} does not pair past_key_values.* inputs with present.* outputs "
                            f"({len(self.past_names)} past, {len(self.present_names)} present): "
                            f"export the decoder with its KV cache and rebuild the engine")
        self.output_names = ["logits", *self.present_names]
        self.layers = len(self.past_names) // 2
        kv_dtype = self.inputs[self.past_names[0]]
        if kv_dtype not in ("float16", "float32", "bfloat16"):
            raise UserError(f"{where}: past_key_values are {kv_dtype}, expected float16, bfloat16 or float32")
        self.kv_dtype = kv_dtype
        self.past_dtype = HOST_DTYPES[kv_dtype]
        first = _dims(engine.get_tensor_shape(self.past_names[0]))
        if len(first) != 4:
            raise UserError(f"{where}: {self.past_names[0]} has rank {len(first)}, expected (batch, kv_heads, past, head_dim)")
        self.kv_heads, self.head_dim = first[1], first[3]

    def _read_profiles(self) -> None:
        count = int(self.engine.num_optimization_profiles)
        if count < 1:
            raise UserError(f"TensorRT engine {self.engine_path} has no optimization profiles")
        self.profiles: list[dict[str, tuple[Shape, Shape, Shape]]] = []
        for p in range(count):
            ranges = {}
            for name in self.inputs:
                mn, opt, mx = (_dims(s) for s in self.engine.get_tensor_profile_shape(name, p))
                ranges[name] = (mn, opt, mx)
            self.profiles.append(ranges)
        names = [p.name for p in self.spec.profiles] if self.spec else []
        self.profile_names = names if len(names) == count else _default_profile_names(count)
        # fixed kv dims from the profile when the engine shape leaves them dynamic
        mn = self.profiles[0][self.past_names[0]][0]
        if self.kv_heads < 0:
            self.kv_heads = mn[1]
        if self.head_dim < 0:
            self.head_dim = mn[3]

    # ---- public

    @property
    def active_profile(self) -> int:
        return self._profile

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), self.past_dtype) for _ in self.past_names]

    def select_profile(self, shapes: dict[str, Shape]) -> int:
        """Index of the first optimization profile whose ranges hold every shape in ``shapes``;
        UserError listing the profiles' ranges when none does."""
        for index, ranges in enumerate(self.profiles):
            if all(_fits(shape, ranges[name][0], ranges[name][2]) for name, shape in shapes.items()):
                return index
        raise UserError(self._no_profile_message(shapes))

    def _no_profile_message(self, shapes: dict[str, Shape]) -> str:
        shown = [n for n in (*ID_INPUTS, self.past_names[0]) if n in shapes]
        got = ", ".join(f"{n} {_shape_text(shapes[n])}" for n in shown)
        parts = []
        for index, ranges in enumerate(self.profiles):
            rows = [f"{n} {_range_text(ranges[n][0], ranges[n][2])}" for n in shown]
            parts.append(f"{self.profile_names[index]} (profile {index}): " + ", ".join(rows))
        past = f" (past length {shapes[self.past_names[0]][2]})" if self.past_names[0] in shapes else ""
        return (f"no optimization profile of {self.engine_path} accepts these shapes: {got}{past}. "
                f"The engine's profiles ([min..max] per dim; past_key_values.* alike): " + "; ".join(parts)
                + ". Shorten the prompt or generation, or rebuild the engine with wider profiles")

    def step(self, input_ids, attention_mask, position_ids, past):
        if self.weights is not None and self.level not in self.checked:
            raise UserError(f"{self.engine_path}: no level is served yet (set_level checks one first)")
        return self._step(input_ids, attention_mask, position_ids, past)

    def _shapes(self, shapes: dict[str, Shape]) -> int:
        """Select the profile for ``shapes`` and set them on the context; the profile's index."""
        index = self.select_profile(shapes)
        ctx = self.context
        if index != self._profile:
            if not ctx.set_optimization_profile_async(index, self.buffers.stream_handle()):
                raise RuntimeError(f"TensorRT refused to switch {self.engine_path} to profile {self.profile_names[index]} "
                                   f"({index}): {self._tail()}")
            self._profile = index
            self.profile_switches += 1
        for name, shape in shapes.items():
            if not ctx.set_input_shape(name, shape):
                raise RuntimeError(f"TensorRT rejected shape {_shape_text(shape)} for {name} "
                                   f"(profile {self.profile_names[index]}): {self._tail()}")
        return index

    def _bind_outputs(self) -> dict[str, tuple[object, Shape]]:
        outs = {}
        for name in self.output_names:
            shape = _dims(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"TensorRT could not infer the shape of {name} ({_shape_text(shape)}): {self._tail()}")
            dev = self.buffers.empty(shape if _volume(shape) > 0 else (1,), self.outputs[name])
            outs[name] = (dev, shape)
            self._bind(name, self.buffers.ptr(dev))
        return outs

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.buffers.stream_handle()):
            raise RuntimeError(f"TensorRT failed to run {self.engine_path}: {self._tail()}")

    def _step(self, input_ids, attention_mask, position_ids, past):
        if len(past) != len(self.past_names):
            raise UserError(f"{len(past)} past tensors given, the engine {self.engine_path} takes {len(self.past_names)}")
        feeds: dict[str, np.ndarray] = {"input_ids": np.asarray(input_ids), "attention_mask": np.asarray(attention_mask)}
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.asarray(position_ids)
        feeds.update((n, np.asarray(p)) for n, p in zip(self.past_names, past))
        self._shapes({n: tuple(int(d) for d in a.shape) for n, a in feeds.items()})
        buf, alive = self.buffers, []  # device tensors must outlive the run
        for name, array in feeds.items():
            dtype = self.inputs[name]
            if array.size == 0:  # a zero-length past still needs a valid, non-null address
                dev = buf.empty((1,), dtype)
            else:
                dev = buf.to_device(np.ascontiguousarray(array, dtype=HOST_DTYPES[dtype]), dtype)
            alive.append(dev)
            self._bind(name, buf.ptr(dev))
        outs = self._bind_outputs()
        self._execute()
        buf.sync()
        host = {}
        for name, (dev, shape) in outs.items():
            if _volume(shape) == 0:
                host[name] = np.zeros(shape, HOST_DTYPES[self.outputs[name]])
            else:
                host[name] = np.asarray(buf.to_host(dev)).reshape(shape)
        del alive
        logits = host["logits"].astype(np.float32, copy=False)
        presents = [host[n].astype(self.past_dtype, copy=False) for n in self.present_names]
        return logits, presents

    def latency(self, batch: int, seq: int, past: int, repeats: int = 20, warmup: int = 3,
                clock: Callable[[], float] = time.perf_counter) -> float:
        """Median seconds of one engine run of ``batch`` x ``seq`` new tokens on a ``past``-token
        cache, inputs resident on the device (no host copies timed: what the kernels cost)."""
        total = past + seq
        shapes = {"input_ids": (batch, seq), "attention_mask": (batch, total), "position_ids": (batch, seq),
                  **{n: (batch, self.kv_heads, past, self.head_dim) for n in self.past_names}}
        shapes = {n: s for n, s in shapes.items() if n in self.inputs}
        self._shapes(shapes)
        host = {"input_ids": np.full((batch, seq), 4), "attention_mask": np.ones((batch, total)),
                "position_ids": np.broadcast_to(np.arange(past, total), (batch, seq))}
        alive = []
        for name, shape in shapes.items():
            array = host.get(name)
            if array is None:  # the cache: zeros (its values do not change the kernels' time)
                dev = self.buffers.zeros(shape if _volume(shape) else (1,), self.inputs[name])
            else:
                dev = self.buffers.to_device(np.ascontiguousarray(array, HOST_DTYPES[self.inputs[name]]), self.inputs[name])
            alive.append(dev)
            self._bind(name, self.buffers.ptr(dev))
        alive.append(self._bind_outputs())
        times = []
        for i in range(warmup + repeats):
            t0 = clock()
            self._execute()
            self.buffers.sync()
            if i >= warmup:
                times.append(clock() - t0)
        del alive
        return float(np.median(times))

    def describe(self) -> dict:
        """TensorRT version, engine, GPU, I/O types and every profile's ranges (JSON-ready)."""
        try:
            gpu = self.buffers.device_name()
        except Exception as e:  # pragma: no cover - informational only
            gpu = f"unknown ({e})"
        profiles = []
        for index, ranges in enumerate(self.profiles):
            profiles.append({"index": index, "name": self.profile_names[index],
                             "ranges": {n: {"min": list(r[0]), "opt": list(r[1]), "max": list(r[2])}
                                        for n, r in ranges.items()}})
        return {"tensorrt": self.version, "engine": str(self.engine_path), "gpu": gpu, "device": self.device,
                "inputs": dict(self.inputs), "outputs": dict(self.outputs),
                "kv": {"layers": self.layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                       "dtype": self.kv_dtype},
                "profiles": profiles, "active_profile": self._profile,
                "levels": list(self.levels), "level": self.level, "refittable": self.refittable, "refits": self.refits}

    # ---- levels: refit and check

    @property
    def refittable(self) -> bool:
        """Whether the engine was built with refittable weights (it can switch level)."""
        return bool(getattr(self.engine, "refittable", False))

    @property
    def dtype(self) -> str:
        """The precision whose tolerances the level check applies: int8, or fp32/fp16 (bf16 too) by its KV cache."""
        int8 = self.spec is not None and str(self.spec.precision).lower() == "int8"
        return "int8" if int8 else "fp32" if self.kv_dtype == "float32" else "fp16"

    def set_level(self, level: str) -> dict:
        """Serve ``level``: refit the engine with that level's prunable weights (unless they are
        loaded), then check one prefill against ONNX Runtime at that level. Returns {"level",
        "switched", "refit_s", "weights" (how many TensorRT took), "check"}. UserError when the
        engine does not serve ``level`` or cannot switch to it (exit 1), or the level drifts (exit 3)."""
        level = str(level)
        if self.levels and level not in self.levels:
            raise UserError(f"the TensorRT engine {self.engine_path} serves level(s) {', '.join(self.levels)}, not {level}: "
                            f"open the engine the bundle lists for {level}")
        out = {"level": level, "switched": False, "refit_s": 0.0, "weights": 0}
        if level != self.level:
            if self.weights is None:
                raise UserError(f"no level weights for {self.engine_path}: open it from its bundle (engines.json)")
            out.update(self._refit(level), switched=True)
        if level not in self.checked and self.weights is not None:
            self.checked[level] = self.check_level(level)
        out["check"] = self.checked.get(level)
        return out

    def _refit(self, level: str) -> dict:
        if not self.refittable:
            raise UserError(f"the TensorRT engine {self.engine_path} was built without refittable weights: it serves "
                            f"only its own level (rebuild it with build_engines.py to switch levels in one engine)")
        self.buffers.sync()  # no step may run while the weights change
        t0 = time.perf_counter()
        arrays = self.weights.arrays(level)
        self.level, self.checked = None, {}  # until the refit is done and checked, no level is served
        refitter = self._refitter()
        known = {str(n) for n in refitter.get_all_weights()}
        unknown = [n for n in arrays if n not in known]
        if unknown:
            raise UserError(f"{self.engine_path} cannot refit {len(unknown)} of the level's weights (first: {unknown[0]}): "
                            f"rebuild it with build_engines.py")
        keep = []
        for name, array in arrays.items():
            self._set_named(refitter, name, array, keep)
        for name in [str(m) for m in refitter.get_missing_weights()]:  # what TensorRT fused with them
            self._set_named(refitter, name, self.weights.tensor(name), keep)
        missing = [str(m) for m in refitter.get_missing_weights()]
        if missing:
            raise UserError(f"TensorRT still wants {len(missing)} weight(s) of {self.engine_path} (first: {missing[0]}): "
                            f"the engine was not built from this bundle's graph")
        if not refitter.refit_cuda_engine():
            raise RuntimeError(f"TensorRT {self.version} failed to refit {self.engine_path} to level {level}: {self._tail()}")
        del keep  # copied into the engine: the host arrays may go
        self.level = level
        self.refits += 1
        return {"refit_s": round(time.perf_counter() - t0, 3), "weights": len(arrays)}

    def _set_named(self, refitter, name: str, array: np.ndarray, keep: list) -> None:
        array = np.ascontiguousarray(array)
        weights = self.trt.Weights(array)
        if not refitter.set_named_weights(name, weights):
            raise UserError(f"TensorRT {self.version} rejected the weights {name} ({array.dtype}{list(array.shape)}) "
                            f"for {self.engine_path}: {self._tail()}")
        keep.append((array, weights))

    def check_level(self, level: str) -> dict:
        """One prefill of ``PROBE_TOKENS`` tokens here and in ONNX Runtime at ``level``, compared with
        the tolerances of two runtimes (``compare.between_runtimes``); the check's result, or
        UserError (exit 3) when the level drifts."""
        ref = self.weights.reference(level)
        vocab = self.weights.vocab_size() or 256
        seq = min(PROBE_TOKENS, max((r["input_ids"][2][1] for r in self.profiles if r[self.past_names[0]][0][2] == 0),
                                    default=0))
        if seq < 1:
            raise UserError(f"{self.engine_path} has no profile for a prefill from an empty cache: it cannot be checked")
        ids = np.random.default_rng(0).integers(4, max(vocab - 1, 5), (1, seq))
        mask = np.ones_like(ids)
        pos = positions(mask, 0)
        want = ref.step(ids, mask, pos, ref.empty_past(1))
        got = self._step(ids, mask, pos, self.empty_past(1))
        valid = np.ones((1, seq), bool)
        check = step_check(want, got, between_runtimes(self.dtype), valid, valid, self.output_names)
        out = {"passed": bool(check["passed"]), "tokens": seq, "worst_output": check["worst_output"],
               "top1_failures": check["top1_failures"],
               "logits_max_abs": check["outputs"]["logits"]["max_abs"], "logits_atol": check["outputs"]["logits"]["atol"]}
        if not out["passed"]:
            worst = check["outputs"][check["worst_output"]]
            raise UserError(f"TensorRT level {level} of {self.engine_path} drifts from ONNX Runtime after its weights "
                            f"were loaded ({check['worst_output']} off by {worst['max_abs']:.3g}, tolerance "
                            f"{worst['atol']:g}; {check['top1_failures']} top-1 disagreements): not served. Rebuild the "
                            f"engine (build_engines.py) or run with --runtime ort", EXIT_INTEGRITY)
        return out

    def _refitter(self):
        try:
            refitter = self.trt.Refitter(self.engine, self._logger)
        except TypeError as e:  # pybind11: the factory returned nullptr
            refitter, why = None, one_line(e)
        else:
            why = "it returned None"
        if refitter is None:
            raise UserError(f"TensorRT {self.version} could not create a refitter for {self.engine_path} ({why}): "
                            f"{self._tail()}")
        return refitter

    # ---- internals

    def _bind(self, name: str, address: int) -> None:
        if self.context.set_tensor_address(name, int(address)) is False:
            raise RuntimeError(f"TensorRT rejected the buffer address of {name}: {self._tail()}")

    def _tail(self) -> str:
        lines = list(getattr(self._logger, "tail", []))
        return " | ".join(lines[-5:]) if lines else "no TensorRT message"
