"""Run a TensorRT engine built by ``epts_export.trt.builder`` (or a bundle's trtexec script) step by
step, with OrtDecoder's interface, so that ``onnx_runtime.greedy`` (and parity) drive an engine
exactly as they drive an ONNX graph.

    dec = TrtDecoder(Path("engines/level-2of4.engine"))
    tokens = greedy(dec.step, dec.empty_past(1), prompt, 32)

    dec = TrtDecoder(Path("engines/unstructured.engine"))   # one engine, levels 0.3, 0.5, 0.7
    dec.set_level("0.7")                                      # refit from level-0.7/model.onnx
    # -> {"level": "0.7", "switched": True, "refit_s": 0.8, "onnx": ..., "weights": 84}

TensorRT >= 10 Python API, name-based I/O (``num_io_tensors``, ``get_tensor_name``, ``get_tensor_mode``,
``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``). The engines have optimization
profiles (``prefill`` = 0, ``decode`` = 1, ``continue`` = 2 in epts-export bundles: an empty cache,
one new token, several new tokens on a cache); each step runs on the first profile whose [min, max]
ranges hold every input shape, switching the context's profile only when it changes.

A bundle's engine for several unstructured levels is refittable: ``set_level`` loads another
level's weights from its baked ONNX graph (TensorRT >= 10: ``OnnxParserRefitter``; 8.x:
``Refitter.set_named_weights`` with the graph's initializers), ``refit_from`` any graph of the
same model. Which levels an engine serves, and each level's graph, come from the bundle's
``engines.json`` next to the engine.

Device memory goes through ``_TorchCudaBuffers`` (torch CUDA tensors), a small class so that the
rest of this module runs, and is tested, without a GPU: tests hand ``TrtDecoder`` a CPU
implementation and a fake ``tensorrt`` module. Nothing imports ``tensorrt`` or touches CUDA at
module level.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import UserError
from ..interface import ID_INPUTS, PAST_RE, PRESENT_RE
from .builder import EngineSpec, import_trt, load_specs, make_logger, start, tensorrt_status
from .refit import read_initializers

# TensorRT DataType member name -> our dtype name (the buffers speak these names)
_TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
               "BOOL": "bool", "INT8": "int8", "UINT8": "uint8"}
# dtype name -> numpy dtype of the host arrays (numpy has no bfloat16: such tensors travel as float32)
HOST_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.float32, "int32": np.int32,
               "int64": np.int64, "bool": np.bool_, "int8": np.int8, "uint8": np.uint8}

Shape = tuple[int, ...]


# --------------------------------------------------------------------------------------------
# device memory


class _TorchCudaBuffers:
    """Device buffers as torch CUDA tensors on one GPU, and the stream TensorRT runs on (torch's
    current stream of that device). The only part of the runtime that needs CUDA."""

    _TORCH_DTYPES = ("float32", "float16", "bfloat16", "int32", "int64", "bool", "int8", "uint8")

    def __init__(self, device: int = 0):
        try:
            import torch
        except Exception as e:
            raise UserError(f"running TensorRT engines needs torch with CUDA (for device memory): {e}") from None
        if not torch.cuda.is_available():
            raise UserError(f"no CUDA GPU visible to torch {torch.__version__}: TensorRT engines need one "
                            f"(a CPU-only torch build cannot hold device buffers)")
        count = torch.cuda.device_count()
        if not 0 <= int(device) < count:
            raise UserError(f"CUDA device {device} does not exist: {count} visible (use 0..{count - 1})")
        self.torch = torch
        self.device = torch.device("cuda", int(device))
        torch.cuda.set_device(self.device)  # TensorRT deserializes and runs on the current device
        self.dtypes = {name: getattr(torch, name) for name in self._TORCH_DTYPES}

    def stream_handle(self) -> int:
        return int(self.torch.cuda.current_stream(self.device).cuda_stream)

    def to_device(self, array: np.ndarray, dtype: str):
        t = self.torch.from_numpy(np.ascontiguousarray(array))
        return t.to(device=self.device, dtype=self.dtypes[dtype]).contiguous()

    def empty(self, shape: Sequence[int], dtype: str):
        return self.torch.empty(tuple(int(d) for d in shape), dtype=self.dtypes[dtype], device=self.device)

    def to_host(self, tensor) -> np.ndarray:
        if tensor.dtype == self.torch.bfloat16:
            tensor = tensor.float()
        return tensor.cpu().numpy()

    def ptr(self, tensor) -> int:
        return int(tensor.data_ptr())

    def sync(self) -> None:
        self.torch.cuda.current_stream(self.device).synchronize()

    def device_name(self) -> str:
        name = self.torch.cuda.get_device_name(self.device)
        major, minor = self.torch.cuda.get_device_capability(self.device)
        return f"{name} (sm_{major}{minor}, cuda:{self.device.index})"


# --------------------------------------------------------------------------------------------
# helpers


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


def bundle_spec(engine_path: Path) -> EngineSpec | None:
    """The engines.json spec of ``engine_path`` from its bundle (the engine's folder or the one above
    it), or None when no readable engines.json lists it."""
    target = Path(engine_path).resolve()
    for folder in (Path(engine_path).parent, Path(engine_path).parent.parent):
        try:
            for spec in load_specs(folder):
                if Path(spec.engine).resolve() == target:
                    return spec
        except (UserError, OSError):
            continue
    return None


def _default_profile_names(count: int) -> list[str]:
    if count == 3:  # what epts-export bundles build: an empty cache, one new token, several on a cache
        return ["prefill", "decode", "continue"]
    if count == 2:  # bundles before the continue profile
        return ["prefill", "decode"]
    if count == 1:
        return ["default"]
    return [f"profile{i}" for i in range(count)]


# --------------------------------------------------------------------------------------------
# the decoder


class TrtDecoder:
    """One TensorRT engine (plan file) and one execution context, with OrtDecoder's interface:
    ``empty_past(batch)``, ``step(input_ids, attention_mask, position_ids, past) -> (logits float32
    (B, S, V), presents)`` and the attributes ``past_dtype``, ``kv_heads``, ``head_dim``.

    Levels: ``levels`` are the levels the engine serves (from its bundle's engines.json; empty for
    an engine outside a bundle), ``level`` the one whose weights are loaded (None when unknown).
    ``set_level(name)`` switches a refittable engine to another of its levels, ``refit_from(onnx)``
    loads the weights of any graph of the same model.

    ``device`` is the CUDA device index; ``log`` gets TensorRT's warnings and errors (stderr by
    default). ``buffers`` replaces the torch-CUDA device memory (tests pass a CPU stand-in).
    ``level``: serve that level from the start (``set_level``; its report is ``load_switch``) --
    what a caller must pass, or do, for an engine that serves several levels, whose plan holds
    only the first one's weights.
    UserError when TensorRT or a GPU is missing, or the plan does not load here (an engine is tied
    to the GPU and TensorRT version that built it).
    """

    def __init__(self, engine_path: Path, device: int = 0, log: Callable[[str], None] | None = None,
                 *, buffers=None, level: str | None = None):
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
        self.buffers = buffers if buffers is not None else _TorchCudaBuffers(self.device)

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
        self.spec = bundle_spec(self.engine_path)
        self.levels: list[str] = list(self.spec.levels) if self.spec else []
        # the plan holds the weights of the graph it was built from (a refit engine's first level)
        built_from = [lv for lv, p in self.spec.refit_from.items() if Path(p) == Path(self.spec.onnx)] if self.spec else []
        self.level: str | None = (built_from or self.levels or [None])[0]
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
        if len(past) != len(self.past_names):
            raise UserError(f"{len(past)} past tensors given, the engine {self.engine_path} takes {len(self.past_names)}")
        feeds: dict[str, np.ndarray] = {"input_ids": np.asarray(input_ids), "attention_mask": np.asarray(attention_mask)}
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.asarray(position_ids)
        feeds.update((n, np.asarray(p)) for n, p in zip(self.past_names, past))
        shapes = {n: tuple(int(d) for d in a.shape) for n, a in feeds.items()}
        index = self.select_profile(shapes)

        ctx, buf = self.context, self.buffers
        stream = buf.stream_handle()
        if index != self._profile:
            if not ctx.set_optimization_profile_async(index, stream):
                raise RuntimeError(f"TensorRT refused to switch {self.engine_path} to profile {self.profile_names[index]} "
                                   f"({index}): {self._tail()}")
            self._profile = index
            self.profile_switches += 1

        alive = []  # device tensors must outlive the run
        for name, shape in shapes.items():
            if not ctx.set_input_shape(name, shape):
                raise RuntimeError(f"TensorRT rejected shape {_shape_text(shape)} for {name} "
                                   f"(profile {self.profile_names[index]}): {self._tail()}")
        for name, array in feeds.items():
            dtype = self.inputs[name]
            if array.size == 0:  # a zero-length past still needs a valid, non-null address
                dev = buf.empty((1,), dtype)
            else:
                dev = buf.to_device(np.ascontiguousarray(array, dtype=HOST_DTYPES[dtype]), dtype)
            alive.append(dev)
            self._bind(name, buf.ptr(dev))

        outs: dict[str, tuple[object, Shape]] = {}
        for name in self.output_names:
            shape = _dims(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"TensorRT could not infer the shape of {name} ({_shape_text(shape)}): {self._tail()}")
            dev = buf.empty(shape if _volume(shape) > 0 else (1,), self.outputs[name])
            outs[name] = (dev, shape)
            self._bind(name, buf.ptr(dev))

        if not ctx.execute_async_v3(stream):
            raise RuntimeError(f"TensorRT failed to run {self.engine_path}: {self._tail()}")
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

    # ---- levels: refit

    @property
    def refittable(self) -> bool:
        """Whether the engine was built with refittable weights (it can switch level)."""
        return bool(getattr(self.engine, "refittable", False))

    def set_level(self, level: str, onnx: Path | None = None) -> dict:
        """Serve ``level``: refit the engine with that level's weights, unless they are loaded.

        ``onnx`` is the level's baked graph; by default the one the bundle's engines.json names for
        it. Returns {"level", "switched" (False when already loaded), "refit_s", "onnx", "weights"
        (how many weights TensorRT took)}. UserError when the engine does not serve ``level`` or
        is not refittable (a level with its own engine: open that engine instead).
        """
        level = str(level)
        if self.levels and level not in self.levels:
            raise UserError(f"the TensorRT engine {self.engine_path} serves level(s) {', '.join(self.levels)}, not {level}: "
                            f"open the engine the bundle lists for {level}")
        if level == self.level:
            return {"level": level, "switched": False, "refit_s": 0.0, "onnx": None, "weights": 0}
        if onnx is None:
            if self.spec is None or level not in self.spec.refit_from:
                raise UserError(f"no graph to refit {self.engine_path} with for level {level}: pass the level's "
                                f"model.onnx (the engine is not listed as refittable in its bundle's engines.json)")
            onnx = self.spec.refit_from[level]
        return {**self.refit_from(onnx, level), "switched": True}

    def refit_from(self, onnx: Path, level: str | None = None) -> dict:
        """Load the weights of the ONNX graph ``onnx`` (a graph of the model the engine was built
        from, like another level's) into the engine, and call them ``level``. Waits for the GPU to
        be idle first. Returns {"level", "onnx", "weights", "refit_s"}. UserError when the engine is
        not refittable or the graph does not fit it; RuntimeError when TensorRT fails to refit."""
        onnx = Path(onnx)
        if not self.refittable:
            raise UserError(f"the TensorRT engine {self.engine_path} was built without refittable weights: it serves "
                            f"only its own level (rebuild it with build_engines.py to switch levels in one engine)")
        if not onnx.is_file():
            raise UserError(f"{onnx} is missing: the refit needs the level's graph (copy the whole bundle)")
        self.buffers.sync()  # no step may run while the weights change
        t0 = time.perf_counter()
        refitter = self._refitter()
        count, keep = self._set_weights(refitter, onnx)
        missing = [str(m) for m in refitter.get_missing_weights()]
        if missing:
            raise UserError(f"{onnx} leaves {len(missing)} weight(s) of {self.engine_path} unset (first: {missing[0]}): "
                            f"it is not a graph of this engine's model")
        if not refitter.refit_cuda_engine():
            raise RuntimeError(f"TensorRT {self.version} failed to refit {self.engine_path} from {onnx}: {self._tail()}")
        del keep  # the weights were copied into the engine: the host arrays may go
        elapsed = time.perf_counter() - t0
        self.level = level
        self.refits += 1
        return {"level": level, "onnx": str(onnx), "weights": count, "refit_s": round(elapsed, 3)}

    def _refitter(self):
        try:
            refitter = self.trt.Refitter(self.engine, self._logger)
        except TypeError as e:  # pybind11: the factory returned nullptr
            refitter, why = None, " ".join(str(e).split())
        else:
            why = "it returned None"
        if refitter is None:
            raise UserError(f"TensorRT {self.version} could not create a refitter for {self.engine_path} ({why}): "
                            f"{self._tail()}")
        return refitter

    def _set_weights(self, refitter, onnx: Path) -> tuple[int, object]:
        """Hand the graph's weights to ``refitter``; (how many, what must stay alive until the refit).
        TensorRT >= 10: its ONNX refitter maps the graph's initializers to the engine's weights (it
        knows what the parser did with them). 8.x has none: each refittable weight is set by the
        initializer name the parser gave it, then the ones TensorRT fused with them."""
        trt = self.trt
        if hasattr(trt, "OnnxParserRefitter"):
            parser = trt.OnnxParserRefitter(refitter, self._logger)
            if not parser.refit_from_file(str(onnx)):
                errors = [str(parser.get_error(i).desc()) for i in range(int(parser.num_errors))]
                raise UserError(f"TensorRT {self.version} could not refit {self.engine_path} from {onnx}: "
                                + ("; ".join(errors) or self._tail()))
            return len(refitter.get_all_weights()), parser
        refittable = [str(n) for n in refitter.get_all_weights()]
        wanted = [w for w in (self.spec.refit_weights if self.spec and self.spec.refit_weights else refittable)
                  if w in refittable]
        keep: dict[str, tuple] = {}
        for names in (wanted, None):  # then what TensorRT fused with them (known once those are set)
            if names is None:
                names = [str(m) for m in refitter.get_missing_weights() if str(m) not in keep]
            for name, array in read_initializers(onnx, names, require=False).items():
                weights = trt.Weights(np.ascontiguousarray(array))
                if not refitter.set_named_weights(name, weights):
                    raise UserError(f"TensorRT {self.version} rejected the weights {name} of {onnx} "
                                    f"({array.dtype}{list(array.shape)}): {self._tail()}")
                keep[name] = (array, weights)
        return len(keep), keep

    # ---- internals

    def _bind(self, name: str, address: int) -> None:
        if self.context.set_tensor_address(name, int(address)) is False:
            raise RuntimeError(f"TensorRT rejected the buffer address of {name}: {self._tail()}")

    def _tail(self) -> str:
        lines = list(getattr(self._logger, "tail", []))
        return " | ".join(lines[-5:]) if lines else "no TensorRT message"
