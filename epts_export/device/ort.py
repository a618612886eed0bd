"""Run an exported decoder step by step in ONNX Runtime (``OrtDecoder``, and ``ElasticDecoder``
for a dynamic export's level switch), with the one greedy loop that every runtime and the PyTorch
reference (``onnx.reference.TorchDecoder``) share, so that parity compares graphs and nothing else.

numpy and onnxruntime only: it ships in bundles (``epts_export.device``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, List, Sequence, Tuple

import numpy as np

from .errors import UserError, one_line
from .files import load_json
from .interface import DECODER_GRAPH, ID_INPUTS, LEVEL_INPUT, LEVELS_FILE, LEVELS_METADATA, WEIGHTS_GRAPH

# step(input_ids, attention_mask, position_ids, past) -> (logits (B, S, V) float32, presents [2 * layers])
StepFn = Callable[[np.ndarray, np.ndarray, np.ndarray, List[np.ndarray]], Tuple[np.ndarray, List[np.ndarray]]]  # typing: Python 3.8


def _options(threads: int | None, profile_prefix: str | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if profile_prefix:  # ORT's per-node profile; session.end_profiling() returns its file
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    if threads:
        opts.intra_op_num_threads = threads
    return opts


def _session(path: Path, opts, providers: Sequence[str]):
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
        raise UserError(f"ONNX Runtime cannot load {path}: {one_line(e)}") from None


def level_table(session, folder: Path) -> list[str] | None:
    """The level names a dynamic graph's ``sparsity_level`` indexes: the graph's ``epts.levels``
    metadata, else ``levels.json`` beside it (graph tools such as Polygraphy's sanitize drop
    metadata); None when neither is there."""
    meta = session.get_modelmeta().custom_metadata_map.get(LEVELS_METADATA)
    where = f"the level table of {folder} ({LEVELS_METADATA} or {LEVELS_FILE})"
    try:
        if meta is not None:
            names = load_json(meta, where)
        elif (Path(folder) / LEVELS_FILE).is_file():
            names = load_json((Path(folder) / LEVELS_FILE).read_bytes(), where).get("levels")
        else:
            return None
    except (UserError, OSError, AttributeError):
        raise UserError(f"the level table of {folder} ({LEVELS_METADATA} or {LEVELS_FILE}) is not valid JSON") from None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise UserError(f"the level table of {folder} ({LEVELS_METADATA} or {LEVELS_FILE}) is not a list of level names")
    return names


def check_level_index(levels: list[str] | None, index, where: Path) -> int:
    """``index`` when it is a valid ``sparsity_level`` for ``levels``; else one UserError line
    (the graph itself would return NaN everywhere, which a generation loop turns into token 0)."""
    if levels is None:
        raise UserError(f"{where} has no level table ({LEVELS_METADATA} metadata or {LEVELS_FILE}): "
                        "cannot tell which level an index selects")
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < len(levels):
        table = ", ".join(f"{i}={n}" for i, n in enumerate(levels))
        raise UserError(f"sparsity_level {index!r} is outside the level table of {where} ({table})")
    return int(index)


BUILDER_ORT = (1, 21)  # the weight builder's uint8 Mul has a CPU kernel from onnxruntime 1.21 on (1.20 lacks it)


def check_weight_builder_runtime(version: str) -> None:
    """UserError unless ONNX Runtime ``version`` runs a dynamic export's weight builder."""
    try:
        have = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        return  # a development build: let it try
    if have < BUILDER_ORT:
        raise UserError(f"the elastic model's weight builder needs onnxruntime {BUILDER_ORT[0]}.{BUILDER_ORT[1]} or later "
                        f"(its uint8 arithmetic), this Python has {version}: pip install -U onnxruntime (Python 3.10 or "
                        f"later), or ship one graph per level (epts-export build --layout baked)")


class OrtDecoder:
    """An ONNX Runtime session over one exported graph. ``level`` is the ``sparsity_level`` fed to
    a dynamic graph (ignored by a baked one); an index outside the graph's level table is refused
    unless ``allow_out_of_range`` (to check the graph's all-NaN contract)."""

    def __init__(self, path: str | Path, level: int | None = None, threads: int | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",), profile_prefix: str | None = None,
                 allow_out_of_range: bool = False):
        path = Path(path)
        self._attach(_session(path, _options(threads, profile_prefix), providers))
        self.dynamic = LEVEL_INPUT in self.inputs
        self.level = level
        self.levels = level_table(self.session, path.parent) if self.dynamic else None
        if self.dynamic and level is None:
            raise UserError(f"{path} is a dynamic-mode graph: pass the level index to run")
        if self.dynamic and not allow_out_of_range:
            check_level_index(self.levels, level, path)

    def _attach(self, session) -> None:
        inputs = {i.name: i for i in session.get_inputs()}
        past = [n for n in inputs if n.startswith("past_key_values.")]
        outputs = [o.name for o in session.get_outputs()]
        if not set(ID_INPUTS) <= set(inputs) or not past or len(inputs[past[0]].shape) != 4 or not outputs \
                or outputs[0] != "logits":
            raise UserError(f"{getattr(self, 'path', None) or getattr(self, 'folder', '')}: the graph is not a decoder "
                            f"with a KV cache (inputs {', '.join(list(inputs)[:4])}...): the folder is corrupted", 3)
        self.session = session
        self.inputs, self.past_names, self.output_names = inputs, past, outputs
        first = self.inputs[self.past_names[0]]
        self.past_dtype = np.float16 if first.type == "tensor(float16)" else np.float32
        self.kv_heads, self.head_dim = first.shape[1], first.shape[3]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), self.past_dtype) for _ in self.past_names]

    def step(self, input_ids, attention_mask, position_ids, past):
        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
                 "position_ids": position_ids.astype(np.int64)}
        feeds.update({n: p.astype(self.past_dtype, copy=False) for n, p in zip(self.past_names, past)})
        if self.dynamic:
            feeds[LEVEL_INPUT] = np.array(self.level, dtype=np.int64)
        outs = self.session.run(None, feeds)
        return outs[0], list(outs[1:])


PACK_MODES = ("auto", "never", "always")
# From how many new tokens "auto" loads a packed session. Its load and a decoded token's saving
# both scale with the prunable bytes, so the counts hardly depend on the model's size. Measured
# on SmolLM2-135M fp32, 2 CPU cores (BENCHMARKS.md, benchmarks/switch_bench.py): a packed load
# takes about 1.4 s, 0.5 s more than an in-place one, and saves about 6 ms per decoded token and
# 25 ms per prefill. With no in-place session open, 64 tokens is where a generation's own decode
# rate, not its start, is what a user waits on (the wall-time break-even is near 80 tokens on a
# switch, 200 for a process's first load); with one open, serving in place costs nothing to start
# and packing pays from about 224 tokens. A prompt counts a token per 64 of its tokens.
PACK_AFTER_TOKENS = 64  # when serving in place would load an in-place session first
PACK_AFTER_TOKENS_IN_PLACE_OPEN = 224  # when an in-place session is open


class ElasticDecoder(OrtDecoder):
    """A dynamic export served one level at a time, switching level in place. ``weights.onnx``
    builds a level's prunable weights straight into buffers this object owns (IOBinding);
    ``decoder.onnx`` takes those buffers as its initializers (``SessionOptions.add_initializer``).

    Two sessions can serve a level from the buffers. The *in-place* one has ONNX Runtime's
    pre-packing off, so each run reads the buffers themselves: ``set_level`` rewrites them (one
    weight build) and it serves the new level at once, but ONNX Runtime's CPU MatMul on unpacked
    weights makes a decoded token about 1.3x slower than a baked graph's. A *packed* session
    copies the buffers into ONNX Runtime's packed layout at load (about a session load) and runs at
    a baked graph's speed; it serves only the level it was loaded at.

    ``pack`` chooses: "never" (in place only: the fastest switch), "always" (a packed session for
    every level, loaded at the switch), "auto" (``prepare(new_tokens, prompt_tokens)`` before a
    generation loads a packed session when the tokens it saves pay for it, counting whether an
    in-place session is there already). At most one packed session is alive: a switch drops it.
    Sessions are loaded when first needed; ``step`` without ``prepare`` serves in place (never) or
    packed (always, auto).

    CPU: measured (tests, ``benchmarks/switch_bench.py``). Another provider (CUDA) gets buffers on
    its device, which ONNX Runtime is documented to use without a copy; that path has not run."""

    def __init__(self, folder: str | Path, level: int, threads: int | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",), pack: str = "never"):
        import onnxruntime as ort

        if pack not in PACK_MODES:
            raise UserError(f"unknown pack mode {pack!r}: {', '.join(PACK_MODES)}")
        check_weight_builder_runtime(ort.__version__)
        self.folder = folder = Path(folder)
        for name in (WEIGHTS_GRAPH, DECODER_GRAPH):
            if not (folder / name).is_file():
                raise UserError(f"{folder / name} is missing: the level switch needs {WEIGHTS_GRAPH} and {DECODER_GRAPH} "
                                "(a dynamic export from an earlier epts-export has only model.onnx: export it again)")
        self.builder = _session(folder / WEIGHTS_GRAPH, _options(threads), providers)
        self.levels = level_table(self.builder, folder)
        check_level_index(self.levels, level, folder)
        device = "cuda" if list(providers)[0] == "CUDAExecutionProvider" else "cpu"
        t = time.perf_counter()
        built = self.builder.run(None, {LEVEL_INPUT: np.array(level, np.int64)})
        self.first_build_s = time.perf_counter() - t
        self.buffers = {o.name: ort.OrtValue.ortvalue_from_numpy(a, device, 0)
                        for o, a in zip(self.builder.get_outputs(), built)}
        self._arrays = built  # the CPU buffers' memory: kept alive as long as the sessions use it
        self.binding = self.builder.io_binding()
        for name, value in self.buffers.items():
            self.binding.bind_ortvalue_output(name, value)
        self.level = level
        self.dynamic = False  # the decoder has no sparsity_level input: the level is in the buffers
        self._threads, self._providers, self._device = threads, list(providers), device
        self.pack = pack if device == "cpu" else "never"  # pre-packing is ONNX Runtime's CPU MatMul's
        self._in_place = self._packed = None
        self._opt_level = None
        self.optimization: str | None = None
        self.session = None
        self.load_s: dict[str, float] = {}  # the last load time of each kind of session
        self.pack_s: float | None = None  # the packed load that the current level's generation waited for
        if self.pack == "never":
            self._use(self._load_in_place())

    # -- sessions ---------------------------------------------------------------------------

    def _decoder_options(self, packed: bool):
        opts = _options(self._threads)
        if not packed:
            opts.add_session_config_entry("session.disable_prepacking", "1")
        for name, value in self.buffers.items():
            opts.add_initializer(name, value)
        return opts

    def _load(self, packed: bool):
        import onnxruntime as ort

        opts = self._decoder_options(packed)
        opts.log_severity_level = 4  # a first failure below is expected: not an error to print
        if self._opt_level is not None:  # the level the first load settled on
            opts.graph_optimization_level = self._opt_level
        try:
            session = _session(self.folder / DECODER_GRAPH, opts, self._providers)
        except UserError:
            # the placeholders make any load-time copy of these weights fail loudly (they hold no
            # bytes): ORT's CPU provider runs float16 MatMuls through inserted Casts, which its
            # level-3 (ALL) optimizations fold into float32 copies. Then load at level 2
            # (EXTENDED), which keeps them.
            opts = self._decoder_options(packed)
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            session = _session(self.folder / DECODER_GRAPH, opts, self._providers)
        self._opt_level = opts.graph_optimization_level
        self.optimization = str(opts.graph_optimization_level).rsplit(".", 1)[-1]
        meta = session.get_modelmeta().custom_metadata_map
        built = self.builder.get_modelmeta().custom_metadata_map
        source = meta.get("epts.source_manifest_sha256")  # graph tools may drop metadata: judged when present
        if meta.get("epts.mode", "dynamic") != "dynamic" or LEVEL_INPUT in {i.name for i in session.get_inputs()} or \
                (source and source != built.get("epts.source_manifest_sha256", source)):
            why = (f"it takes {LEVEL_INPUT} itself" if LEVEL_INPUT in {i.name for i in session.get_inputs()} else
                   f"a {meta.get('epts.mode')} graph" if meta.get("epts.mode", "dynamic") != "dynamic" else
                   "it was exported from another artifact")
            raise UserError(f"{self.folder / DECODER_GRAPH} is not the decoder that goes with {WEIGHTS_GRAPH} ({why}): "
                            "the folder is corrupted", 3)
        return session

    def _load_in_place(self):
        t = time.perf_counter()
        self._in_place = self._load(packed=False)
        self.load_s["in place"] = time.perf_counter() - t
        return self._in_place

    def _load_packed(self):
        """A session that packs the current level's weights at load (what a baked graph's session
        does with its own); it never reads the buffers again."""
        self._drop_packed()  # at most one packed copy: the old level's goes first
        t = time.perf_counter()
        session = self._load(packed=True)
        self._packed = (self.level, session)
        self.pack_s = self.load_s["packed"] = time.perf_counter() - t
        return session

    def _drop_packed(self) -> None:
        """Release the packed session (its input descriptions hold it too) and its memory."""
        if self._packed is None:
            return
        self._packed, self.pack_s = None, None
        if self._in_place is not None:
            self._attach(self._in_place)
        else:
            self.session, self.inputs = None, {}

    def _use(self, session) -> None:
        if session is not self.session:
            self._attach(session)

    @property
    def packed(self) -> bool:
        """Whether the session in use is a packed one."""
        return self.session is not None and self.session is not self._in_place

    def pays_to_pack(self, new_tokens: int, prompt_tokens: int = 0) -> bool:
        """Whether a packed session for the current level saves more time over ``new_tokens``
        decoded tokens after a prompt of ``prompt_tokens`` than it costs to load, against serving
        in place (loading the in-place session first when it is not open)."""
        tokens = new_tokens + prompt_tokens // 64
        return tokens >= (PACK_AFTER_TOKENS_IN_PLACE_OPEN if self._in_place is not None else PACK_AFTER_TOKENS)

    def prepare(self, new_tokens: int, prompt_tokens: int = 0) -> str:
        """Pick (loading it if needed) the session for a generation of ``new_tokens`` after a
        prompt of ``prompt_tokens``; returns "packed" or "in place"."""
        if self._packed is not None and self._packed[0] == self.level:
            self._use(self._packed[1])
        elif self.pack == "always" or (self.pack == "auto" and self.pays_to_pack(new_tokens, prompt_tokens)):
            self._use(self._load_packed())
        else:
            self._use(self._in_place or self._load_in_place())
        return "packed" if self.packed else "in place"

    # -- levels ---------------------------------------------------------------------------

    def level_weights(self) -> dict[str, np.ndarray]:
        """name -> the current level's prunable weight: on the CPU the very buffers the decoder
        reads (valid until the next ``set_level``), on another device a host copy."""
        if self._device == "cpu":
            return dict(zip(self.buffers, self._arrays))
        return {name: value.numpy() for name, value in self.buffers.items()}

    def set_level(self, level: int) -> float:
        """Build level ``level``'s weights into the decoder's buffers; returns the seconds it took.
        A packed session of the old level is dropped; the next generation's ``prepare`` (or step)
        loads one for the new level when the mode asks. Call it between generations (never while
        a step runs in another thread)."""
        check_level_index(self.levels, level, self.folder)
        t = time.perf_counter()
        self._drop_packed()
        self.binding.bind_cpu_input(LEVEL_INPUT, np.array(level, np.int64))
        self.builder.run_with_iobinding(self.binding)
        self.binding.synchronize_outputs()
        self.level = level
        return time.perf_counter() - t

    def empty_past(self, batch: int) -> list[np.ndarray]:
        if self.session is None:
            self.prepare(1 << 30 if self.pack != "never" else 0)
        return super().empty_past(batch)

    def step(self, input_ids, attention_mask, position_ids, past):
        if self.session is None:
            self.prepare(1 << 30 if self.pack != "never" else 0)
        return super().step(input_ids, attention_mask, position_ids, past)


def positions(attention_mask: np.ndarray, past_len: int) -> np.ndarray:
    """position_ids for the new tokens from a (left-padded) attention mask: cumsum - 1, pads at 1
    (optimum's rule for LLaMA; OPT adds its own offset inside the model)."""
    pos = np.cumsum(attention_mask, axis=1) - 1
    pos = np.where(attention_mask == 0, 1, pos)
    return pos[:, past_len:]


def greedy(step: StepFn, empty_past: list[np.ndarray], prompt: Sequence[int], new_tokens: int,
           on_token: Callable[[int], None] | None = None, stop: int | None = None) -> list[int]:
    """Greedy decoding of up to ``new_tokens`` tokens for one prompt with a KV cache: one
    prefill step, then one step per token; ends early after the token ``stop`` (e.g. EOS)."""
    ids = np.array([list(prompt)], dtype=np.int64)
    mask = np.ones_like(ids)
    past = empty_past
    out: list[int] = []
    feed = ids
    for _ in range(new_tokens):
        past_len = mask.shape[1] - feed.shape[1]
        logits, past = step(feed, mask, positions(mask, past_len), past)
        tok = int(np.argmax(logits[0, -1]))
        out.append(tok)
        if on_token:
            on_token(tok)
        if stop is not None and tok == stop:
            break
        feed = np.array([[tok]], dtype=np.int64)
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
    return out
