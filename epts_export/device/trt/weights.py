"""Where a TensorRT engine's level weights come from on the device, and what a level is checked against.

An elastic bundle stores one copy of the weights for every level: ``weights.onnx`` builds a level's
prunable weights from ``sparsity_level`` (ONNX Runtime, CPU) and ``decoder.onnx`` runs with them
(``device.ort.ElasticDecoder``). ``LevelWeights`` puts that to three uses:

* ``bake(level)``: write the level's prunable weights into ``decoder.weights``, where
  ``decoder.onnx`` keeps them (empty as shipped, so that the graph alone does not load), so that
  TensorRT and trtexec parse that level's plain graph and build it with its weights as constants
  (sparse tactics need them so); ``clean()`` empties the file again;
* ``arrays(level)``: the same weights as numpy arrays, for a refit (``TrtDecoder.set_level``), and
  ``tensor(name)`` any other weight of the graph that TensorRT asks for with them (a GEMM bias it
  fused), read at its offset in the bundle's files: no ONNX parser on the device;
* ``reference(level)``: the ONNX Runtime decoder at that level, which every level TensorRT serves is
  checked against after its weights changed (``TrtDecoder.check_level``).

``BakedLevels`` gives the last of these for a baked-layout bundle (one graph per level, no refit).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..files import atomic_path
from .spec import EngineSpec, WeightSource


class LevelWeights:
    """An elastic bundle's levels, served from its weight builder (one ElasticDecoder, CPU, opened
    on first use and switched in place)."""

    def __init__(self, source: WeightSource, threads: int | None = None):
        self.source = source
        self.threads = threads
        self._decoder = None

    def _switch(self, level: str):
        from ..ort import ElasticDecoder

        if level not in self.source.levels:
            raise UserError(f"level {level} is not in the weight builder's table ({', '.join(self.source.levels)})")
        index = self.source.levels[level]
        if self._decoder is None:
            self._decoder = ElasticDecoder(self.source.model, index, threads=self.threads)
        elif self._decoder.level != index:
            self._decoder.set_level(index)
        table = self._decoder.levels
        if table[index] != level:  # engines.json and the graphs' own level table must agree
            raise UserError(f"engines.json gives level {level} the index {index}, which the weight builder's table "
                            f"names {table[index]!r}: the bundle is inconsistent, rebuild it", 3)
        return self._decoder

    def arrays(self, level: str) -> dict[str, np.ndarray]:
        """name -> the level's prunable weight (valid until the next switch: the decoder's buffers)."""
        return self._switch(level).level_weights()

    def reference(self, level: str):
        """The ONNX Runtime decoder serving ``level`` (step/empty_past)."""
        return self._switch(level)

    def tensor(self, name: str) -> np.ndarray:
        """Any initializer of the engine graph, read from where ``engines.json`` says it lies."""
        ref = self.source.tensors.get(name)
        if ref is None or ref.file == self.source.weights_file.name:
            raise UserError(f"TensorRT asked for weight {name}, which the engine graph {self.source.graph} does not hold "
                            f"outside the level weights")
        dtype = np.dtype(ref.dtype)
        count = ref.length // dtype.itemsize
        if count != int(np.prod(ref.shape, dtype=np.int64)):
            raise UserError(f"engines.json: tensor {name} is {ref.length} bytes, not a {ref.dtype} array of shape {list(ref.shape)}")
        path = self.source.graph.parent / ref.file
        try:
            data = np.fromfile(path, dtype=dtype, count=count, offset=ref.offset)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read weight {name} from {path}: {e}") from None
        if data.size != count:
            raise UserError(f"{path} ends before weight {name} (offset {ref.offset}, {ref.length} bytes): copy the whole bundle")
        return data.reshape(ref.shape)

    def bake(self, level: str) -> Path:
        """Write ``level``'s prunable weights into the engine graph's weights file; returns the graph,
        now a plain ONNX graph of that level (TensorRT, trtexec and ONNX Runtime load it)."""
        arrays = self.arrays(level)
        src = self.source
        with atomic_path(src.weights_file) as tmp:
            with open(tmp, "wb") as f:
                for name in src.prunable:
                    ref, array = src.tensors[name], arrays.get(name)
                    if array is None or array.dtype != np.dtype(ref.dtype) or tuple(array.shape) != ref.shape:
                        got = "nothing" if array is None else f"{array.dtype}{list(array.shape)}"
                        raise UserError(f"the weight builder gives {got} for {name}, the engine graph wants "
                                        f"{ref.dtype}{list(ref.shape)}: the bundle is inconsistent, rebuild it", 3)
                    f.seek(ref.offset)
                    f.write(np.ascontiguousarray(array).tobytes())
        return src.graph

    def clean(self) -> None:
        """Empty the weights file again, as the bundle ships it (a bake fills it with one level's
        weights, about the model's size)."""
        path = self.source.weights_file
        if path.is_file() and path.stat().st_size:
            with atomic_path(path) as tmp:
                tmp.write_bytes(b"")

    def vocab_size(self) -> int | None:
        return _vocab(self.source.model)


class BakedLevels:
    """A baked-layout bundle's levels: each level's own graph is its reference; nothing is refit."""

    def __init__(self, graphs: dict[str, Path], threads: int | None = None):
        self.graphs, self.threads, self._open = dict(graphs), threads, {}

    def arrays(self, level: str) -> dict[str, np.ndarray]:
        raise UserError(f"level {level} has its own graph in this bundle: its engine is not refit")

    def tensor(self, name: str) -> np.ndarray:
        raise UserError(f"weight {name}: engines of a baked-layout bundle are not refit")

    def reference(self, level: str):
        from ..ort import OrtDecoder

        if level not in self._open:
            self._open.clear()  # one graph in memory at a time
            self._open[level] = OrtDecoder(self.graphs[level], threads=self.threads)
        return self._open[level]

    def vocab_size(self) -> int | None:
        first = next(iter(self.graphs.values()), None)
        return _vocab(Path(first).parent) if first else None


def _vocab(folder: Path) -> int | None:
    try:
        value = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, int) and value > 0 else None


def default_levels(spec: EngineSpec | None, source: WeightSource | None, threads: int | None = None):
    """The level weights and references an engine of a bundle is refit and checked with: the weight
    builder of an elastic bundle, each level's own graph in a baked-layout one; None outside a bundle."""
    if spec is None:
        return None
    if source is not None:
        return LevelWeights(source, threads)
    return BakedLevels({lv: Path(spec.onnx) for lv in spec.levels}, threads)
