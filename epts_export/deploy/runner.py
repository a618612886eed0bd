"""Generating from a bundle or an ONNX export: the loop behind `epts-export run` and the bundle's
own ``run.py`` (bundles only).

A bundle carries a copy of this module and the few it imports (``_epts/``: standard library,
numpy, ``tokenizers`` and ONNX Runtime; TensorRT's bindings for ``--runtime trt``), so that a
device runs it without epts-export, torch or transformers:

    python3 dist/jetson-orin/run.py --level 2:4 --prompt "Hello"

Before anything is loaded, every file of the chosen level is checked against the manifest's
sha256 (exit 3 on a mismatch). Greedy decoding with the KV cache, text streamed as it is decoded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

from ..core.levels import Level, parse_levels
from ..errors import UserError
from ..interface import GRAPH_FILE
from .bundle import EXIT_INTEGRITY, Bundle

RUNTIMES = ("auto", "trt", "ort")
RUN_SCRIPT = "run.py"
VENDOR_DIR = "_epts"
# what run.py imports, relative to the epts_export package (package __init__ files are written empty,
# except the top one, which only sets __version__)
RUNNER_FILES = ("__init__.py", "errors.py", "fsutil.py", "interface.py", "core/levels.py", "onnx/runtime.py",
                "deploy/archive.py", "deploy/bundle.py", "deploy/runner.py", "trt/builder.py", "trt/sparse.py", "trt/refit.py",
                "trt/runtime.py")


class TextTokenizer:
    """A level's ``tokenizer.json`` through the ``tokenizers`` library, with the tokenizer's EOS."""

    def __init__(self, folder: Path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UserError("running a bundle needs the `tokenizers` package: pip install tokenizers") from None
        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"{path} is missing: the level folder needs its tokenizer")
        self.tokenizer = Tokenizer.from_file(str(path))
        self.eos = self._eos(Path(folder))

    def _eos(self, folder: Path) -> int | None:
        """The id of the tokenizer's eos_token (as transformers' ``tokenizer.eos_token_id``), else
        the generation config's first eos id."""
        conf = folder / "tokenizer_config.json"
        if conf.is_file():
            token = json.loads(conf.read_text()).get("eos_token")
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str) and self.tokenizer.token_to_id(token) is not None:
                return self.tokenizer.token_to_id(token)
        gen = folder / "generation_config.json"
        eos = json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None
        return eos[0] if isinstance(eos, list) and eos else eos

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def context_length(folder: Path) -> int | None:
    """``max_position_embeddings`` of a level's config.json (None when it does not say)."""
    path = Path(folder) / "config.json"
    value = json.loads(path.read_text()).get("max_position_embeddings") if path.is_file() else None
    return int(value) if isinstance(value, int) else None


def open_decoder(b: Bundle, level: Level, runtime: str, threads: int | None):
    """(decoder with ``step``/``empty_past``, "tensorrt" | "onnxruntime") for a bundle's level:
    the level's engine when ``runtime`` is trt (or auto and it can run here), else its ONNX graph."""
    if runtime not in RUNTIMES:
        raise UserError(f"unknown --runtime {runtime!r}: auto, trt or ort")
    folder = b.path / b.level_record(level)["dir"]
    if runtime != "ort":
        from ..trt.builder import tensorrt_status

        engine, _ = b.engine_for(level)
        ok, why = tensorrt_status()
        if runtime == "trt" and engine is None:
            raise UserError(f"level {level.name} has no engine in {b.path}: build it with build_engines.sh, or use --runtime ort")
        if runtime == "trt" and not ok:
            raise UserError(f"cannot run TensorRT here: {why}")
        if engine is not None and ok:
            from ..trt.runtime import TrtDecoder

            return TrtDecoder(engine, level=level.name), "tensorrt"  # a shared engine refits to this level
    from ..onnx.runtime import OrtDecoder

    return OrtDecoder(folder / GRAPH_FILE, threads=threads), "onnxruntime"


EXPORT_FORMAT = "epts-onnx"  # onnx.reader.EXPORT's format name (not imported: run.py ships without it)


class _ExportSource:
    """An ONNX export folder (from `epts-export export`) as a source of decoders: a baked level's
    graph, or a dynamic export's one ``ElasticDecoder`` that switches level in place."""

    def __init__(self, path: Path):
        from ..onnx.reader import OnnxExport

        self.exp = OnnxExport.open(path, verify="skip")  # files are hash-checked per level, before use
        self.path = self.exp.path
        self.switcher = None
        self.verified = False  # dynamic: every file serves every level, so one check serves them all

    def folder(self, level: Level) -> Path:
        return self.exp.graph_path(self._known(level)).parent

    def _known(self, level: Level) -> Level:
        if level not in self.exp.levels:
            have = ", ".join(lv.name for lv in self.exp.levels)
            raise UserError(f"level {level.name} is not in export {self.path} (it has {have})")
        return level

    def level_errors(self, level: Level):
        from ..fsutil import hash_errors

        files = self.exp.manifest.get("files", {})
        if self.exp.mode == "baked":
            where = self.exp.graph_path(self._known(level)).parent.name + "/"
            return hash_errors(self.path, {rel: digest for rel, digest in files.items() if rel.startswith(where)})
        self._known(level)
        if self.verified:
            return []
        errors = hash_errors(self.path, files)
        self.verified = not errors
        return errors

    def decoder(self, level: Level, runtime: str, threads: int | None):
        """(decoder, runtime name, seconds the level switch took or None when a decoder was opened)."""
        from ..onnx.runtime import ElasticDecoder, OrtDecoder

        if runtime == "trt":
            raise UserError(f"{self.path} is an ONNX export, which has no TensorRT engines: run a bundle (epts-export build) "
                            "or use --runtime ort")
        idx = self.exp.level_index(self._known(level))
        if self.exp.mode == "baked":
            return OrtDecoder(self.exp.graph_path(level), threads=threads), "onnxruntime", None
        if self.switcher is not None:
            if isinstance(self.switcher, ElasticDecoder):
                return self.switcher, "onnxruntime", self.switcher.set_level(idx)
            self.switcher.level = idx  # an older export's whole graph: the level is just an input
            return self.switcher, "onnxruntime", 0.0
        if self.exp.has_parts:
            self.switcher = ElasticDecoder(self.path, idx, threads=threads)
        else:
            self.switcher = OrtDecoder(self.path / GRAPH_FILE, level=idx, threads=threads)
        return self.switcher, "onnxruntime", None


class _BundleSource:
    def __init__(self, path: Path):
        self.bundle = Bundle.open(path)
        self.path = self.bundle.path

    def folder(self, level: Level) -> Path:
        return self.path / self.bundle.level_record(level)["dir"]

    def level_errors(self, level: Level):
        return self.bundle.level_errors(level)

    def decoder(self, level: Level, runtime: str, threads: int | None):
        dec, used = open_decoder(self.bundle, level, runtime, threads)
        return dec, used, None


class Runner:
    """A bundle or an ONNX export folder, opened once, that generates at any of its levels in
    turn. A dynamic export keeps one session and switches it to each level (one weight build);
    a bundle or a baked export opens each level's graph or engine."""

    def __init__(self, path: str | Path, runtime: str = "auto", threads: int | None = None):
        if runtime not in RUNTIMES:
            raise UserError(f"unknown --runtime {runtime!r}: auto, trt or ort")
        p = Path(path)
        self.runtime, self.threads = runtime, threads
        self.source = _ExportSource(p) if _manifest_format(p) == EXPORT_FORMAT else _BundleSource(p)

    def generate(self, level: Level, prompt: str, max_new_tokens: int = 64, on_text: Callable[[str], None] | None = None,
                 on_note: Callable[[str], None] | None = None) -> dict:
        """Greedy generation at ``level`` with the KV cache, streaming decoded text to ``on_text``.
        The level's files are hash-checked first (UserError, exit 3); a prompt longer than the
        model's context is refused and ``max_new_tokens`` is capped to what is left (said through
        ``on_note``). Returns tokens, text and timings (load or switch, prefill, tokens/s)."""
        from ..onnx.runtime import greedy

        if max_new_tokens < 1:
            raise UserError("--max-new-tokens must be >= 1")
        src = self.source
        folder = src.folder(level)
        bad = src.level_errors(level)
        if bad:
            raise UserError(f"{src.path} failed verification for level {level.name}: "
                            + "; ".join(map(str, bad[:5])) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""),
                            EXIT_INTEGRITY)
        tok = TextTokenizer(folder)
        ids = tok.encode(prompt)
        if not ids:
            raise UserError("the prompt tokenizes to nothing: pass some text with --prompt")
        context = context_length(folder)
        if context is not None:
            if len(ids) >= context:
                raise UserError(f"the prompt is {len(ids)} tokens, the model's context is {context}: shorten the prompt")
            if len(ids) + max_new_tokens > context:
                max_new_tokens = context - len(ids)
                if on_note:
                    on_note(f"--max-new-tokens capped at {max_new_tokens}: the model's context is {context} tokens")
        t0 = time.perf_counter()
        dec, used, switch_s = src.decoder(level, self.runtime, self.threads)
        load_s = time.perf_counter() - t0
        produced: list[int] = []
        shown = ""
        stamps: list[float] = []

        def on_token(t: int) -> None:
            nonlocal shown
            stamps.append(time.perf_counter())
            produced.append(t)
            text = tok.decode(produced)
            if on_text and text.startswith(shown):
                on_text(text[len(shown):])
            shown = text

        start = time.perf_counter()
        out = greedy(dec.step, dec.empty_past(1), ids, max_new_tokens, on_token, stop=tok.eos)
        decode_s = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
        return {"level": level.name, "prompt_tokens": len(ids), "tokens": out, "text": shown,
                "load_s": None if switch_s is not None else round(load_s, 3),
                "switch_s": None if switch_s is None else round(switch_s, 4),
                "prefill_s": round(stamps[0] - start, 3) if stamps else None,
                "decode_tok_s": round((len(stamps) - 1) / decode_s, 2) if decode_s > 0 else None,
                "runtime": used}


def _manifest_format(path: Path) -> str | None:
    """The format named by a folder's manifest.json (None for anything else: a bundle archive, a
    missing or unreadable manifest, which Bundle.open then reports)."""
    m = path / "manifest.json"
    try:
        return json.loads(m.read_text(encoding="utf-8")).get("format") if path.is_dir() and m.is_file() else None
    except (ValueError, OSError, AttributeError):
        return None


def generate(path: str | Path, level: Level, prompt: str, max_new_tokens: int = 64,
             on_text: Callable[[str], None] | None = None, threads: int | None = None, runtime: str = "auto",
             on_note: Callable[[str], None] | None = None) -> dict:
    """One generation from a bundle or export folder (``Runner.generate``)."""
    return Runner(path, runtime, threads).generate(level, prompt, max_new_tokens, on_text, on_note)


def describe(r: dict) -> str:
    """The one line printed after a generation."""
    how = f"switch {1e3 * r['switch_s']:.0f} ms" if r.get("switch_s") is not None else f"load {r['load_s']:.2f} s"
    return (f"level {r['level']} on {r['runtime']}: {len(r['tokens'])} tokens, {how}, prefill {r['prefill_s']:.3f} s, "
            f"{r['decode_tok_s']} tokens/s")


# --------------------------------------------------------------------------------------------
# the standalone runner: run.py and its copy of the package


_RUN_PY = '''#!/usr/bin/env python3
"""Run this bundle on the device (written by epts-export; needs numpy, tokenizers and onnxruntime,
or TensorRT's bindings and torch for --runtime trt; not epts-export, torch or transformers):

    python3 run.py --level 0.5 --prompt "Hello"
    python3 run.py --help

Imports only the copy of epts-export's runner in _epts/ beside this file (hashed in manifest.json),
never other files of this folder.
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[0] = str(HERE / "_epts")  # instead of this folder: nothing here but _epts/ is imported
sys.dont_write_bytecode = True  # no __pycache__ among the bundle's hashed files

from epts_export.deploy.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], bundle=HERE))
'''


def write_runner(bundle: Path) -> Path:
    """Write ``run.py`` and the package files it imports (``_epts/epts_export/...``) into ``bundle``."""
    from ..fsutil import vendor_package, write_text

    vendor_package(Path(bundle) / VENDOR_DIR, RUNNER_FILES)
    script = Path(bundle) / RUN_SCRIPT
    write_text(script, _RUN_PY)
    script.chmod(script.stat().st_mode | 0o111)
    return script


def main(argv: list[str] | None = None, bundle: Path | None = None) -> int:
    """``run.py``'s command line; returns the exit code (1 bad input, 3 a file does not match)."""
    ap = argparse.ArgumentParser(prog="run.py", description="Generate text from this bundle (greedy, KV cache, streamed).")
    ap.add_argument("--level", required=True, action="append", help="level(s) to run, e.g. 0.5 or 0.5,2:4 (repeatable)")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--runtime", default="auto", choices=RUNTIMES)
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    ap.add_argument("--bundle", type=Path, default=bundle, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        levels = [lv for text in args.level for lv in parse_levels(text)]
        runner = Runner(args.bundle, args.runtime, args.threads)
        for lv in levels:
            r = runner.generate(lv, args.prompt, args.max_new_tokens, on_text=lambda s: print(s, end="", flush=True),
                                on_note=lambda s: print(f"note: {s}", file=sys.stderr))
            print()
            print(f"{describe(r)}; tokens {r['tokens']}", file=sys.stderr)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
