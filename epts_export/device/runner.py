"""Generating from a bundle or an ONNX export: the loop behind `epts-export run` and the bundle's
own ``run.py``.

A bundle carries this package (``_epts/epts_export/device/``: standard library, numpy,
``tokenizers`` and ONNX Runtime; TensorRT's bindings for ``--runtime trt``), so that a device runs
it without epts-export, torch or transformers:

    python3 dist/jetson-orin/run.py --level 0.3,0.7,2:4 --prompt "Hello"

An elastic bundle or a dynamic export serves every level from one load, switching in place (one
weight build; a TensorRT refit engine: one refit and its check). Before anything is loaded, the
level's files are checked against the manifest's sha256 (exit 3 on a mismatch). Greedy decoding
with the KV cache, text streamed as it is decoded.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Callable

from .bundle import Bundle
from .errors import EXIT_INTEGRITY, UserError, install_sigterm, interrupted_line, one_line, terminated
from .files import load_json
from .interface import EXPORT, GRAPH_FILE
from .levels import Level

RUNTIMES = ("auto", "trt", "ort")


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
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises plain Exceptions for a file it cannot read
            raise UserError(f"{path} is not a tokenizer the tokenizers library reads ({one_line(e)}): the folder is "
                            "corrupted", EXIT_INTEGRITY) from None
        self.eos = self._eos(Path(folder))

    def _eos(self, folder: Path) -> int | None:
        """The id of the tokenizer's eos_token (as transformers' ``tokenizer.eos_token_id``), else
        the generation config's first eos id."""
        conf = folder / "tokenizer_config.json"
        if conf.is_file():
            token = _json_object(conf).get("eos_token")
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str) and self.tokenizer.token_to_id(token) is not None:
                return self.tokenizer.token_to_id(token)
        gen = folder / "generation_config.json"
        eos = _json_object(gen).get("eos_token_id") if gen.is_file() else None
        eos = eos[0] if isinstance(eos, list) and eos else eos
        return eos if isinstance(eos, int) and not isinstance(eos, bool) else None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def context_length(folder: Path) -> int | None:
    """``max_position_embeddings`` of a level's config.json (None when it does not say)."""
    path = Path(folder) / "config.json"
    value = _json_object(path).get("max_position_embeddings") if path.is_file() else None
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _json_object(path: Path) -> dict:
    """A level folder's JSON config (config.json, tokenizer_config.json, ...) as an object; UserError otherwise."""
    try:
        doc = load_json(Path(path).read_bytes(), str(path), "the level folder is corrupted", EXIT_INTEGRITY)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path} is not a JSON object; the level folder is corrupted", EXIT_INTEGRITY)
    return doc


class _Switcher:
    """One ElasticDecoder over a dynamic export's or an elastic bundle's model folder, opened at
    the first level asked for and switched in place after that."""

    def __init__(self, folder: Path, threads: int | None, pack: str):
        self.folder, self.threads, self.pack, self.decoder = Path(folder), threads, pack, None

    def serve(self, index: int, name: str):
        """(decoder at level ``index``, seconds the switch took or None when it was opened)."""
        from .ort import ElasticDecoder

        if self.decoder is None:
            self.decoder = ElasticDecoder(self.folder, index, threads=self.threads, pack=self.pack)
            seconds = None
        else:
            seconds = self.decoder.set_level(index)
        table = self.decoder.levels
        if table[index] != name:  # the manifest and the graphs' own level table must agree
            raise UserError(f"the manifest gives level {name} the index {index}, which the graphs' level table of "
                            f"{self.folder} names {table[index]!r}: the folder is inconsistent, rebuild it", EXIT_INTEGRITY)
        return self.decoder, seconds


class _ExportSource:
    """An ONNX export folder (from `epts-export export`) as a source of decoders: a baked level's
    graph, or a dynamic export's one ``ElasticDecoder`` that switches level in place."""

    def __init__(self, path: Path, threads: int | None, pack: str):
        from .files import inside, read_manifest, require_listed
        from .interface import DECODER_GRAPH, WEIGHTS_GRAPH

        self.path = Path(path)
        self.manifest = read_manifest(self.path, EXPORT)
        self.mode = self.manifest.get("mode")
        self.records = self.manifest["levels"]
        for k, r in enumerate(self.records):
            if not isinstance(r, dict) or not isinstance(r.get("name"), str):
                raise UserError(f"{self.path / 'manifest.json'}: levels[{k}] is not a level record", EXIT_INTEGRITY)
            at = f"{self.path / 'manifest.json'} levels[{k}]"
            if self.mode == "baked":
                folder = inside(r.get("dir"), at)
                if any(folder == o.get("dir") for o in self.records[:k] if isinstance(o, dict)):
                    raise UserError(f"{at}: folder {folder!r} is another level's too", EXIT_INTEGRITY)
                require_listed(self.manifest["files"], folder, (GRAPH_FILE, "tokenizer.json"), at)
        files = self.manifest["files"]
        if self.mode != "baked" and not ({WEIGHTS_GRAPH, DECODER_GRAPH} <= set(files) or GRAPH_FILE in files):
            raise UserError(f"{self.path / 'manifest.json'} lists neither {WEIGHTS_GRAPH} and {DECODER_GRAPH} nor "
                            f"{GRAPH_FILE}: the export is corrupted", EXIT_INTEGRITY)
        self.threads, self.verified, self.whole = threads, False, None
        self.switcher = _Switcher(self.path, threads, pack)

    def _record(self, level: Level) -> dict:
        from .levels import parse_level

        for r in self.records:
            if parse_level(str(r.get("name"))) == level:
                return r
        have = ", ".join(str(r.get("name")) for r in self.records)
        raise UserError(f"level {level.name} is not in export {self.path} (it has {have})")

    def folder(self, level: Level) -> Path:
        rec = self._record(level)
        return self.path / rec["dir"] if self.mode == "baked" else self.path

    def level_errors(self, level: Level):
        from .files import MANIFEST, hash_errors, unlisted_under

        files = self.manifest.get("files", {})
        if self.mode == "baked":
            where = self._record(level)["dir"]
            return [*hash_errors(self.path, {rel: digest for rel, digest in files.items() if rel.startswith(where + "/")}),
                    *unlisted_under(self.path, where, files)]
        self._record(level)
        if self.verified:
            return []
        errors = hash_errors(self.path, files) + [e for e in unlisted_under(self.path, ".", files, (MANIFEST, "report.html"))
                                                  if "/" not in e.path]  # files beside the graphs  # dynamic: every file serves every level, so one check serves them all
        self.verified = not errors
        return errors

    def decoder(self, level: Level, runtime: str):
        """(decoder, runtime name, seconds the level switch took or None when a decoder was opened)."""
        from .interface import DECODER_GRAPH, WEIGHTS_GRAPH
        from .ort import OrtDecoder

        if runtime == "trt":
            raise UserError(f"{self.path} is an ONNX export, which has no TensorRT engines: run a bundle (epts-export build) "
                            "or use --runtime ort")
        rec = self._record(level)
        if self.mode == "baked":
            return OrtDecoder(self.folder(level) / GRAPH_FILE, threads=self.threads), "onnxruntime", None
        index = [str(r.get("name")) for r in self.records].index(rec["name"])
        if {WEIGHTS_GRAPH, DECODER_GRAPH} <= set(self.manifest.get("files", {})):
            dec, seconds = self.switcher.serve(index, rec["name"])
            return dec, "onnxruntime", seconds
        # an export from before weights.onnx/decoder.onnx: the whole graph, the level an input
        if self.whole is None:
            self.whole = OrtDecoder(self.path / GRAPH_FILE, level=index, threads=self.threads)
            if self.whole.levels and self.whole.levels[index] != rec["name"]:
                raise UserError(f"the manifest gives level {rec['name']} the index {index}, which the graph's level table "
                                f"names {self.whole.levels[index]!r}: the export is inconsistent", EXIT_INTEGRITY)
            return self.whole, "onnxruntime", None
        self.whole.level = index
        return self.whole, "onnxruntime", 0.0


class _BundleSource:
    """A bundle: its levels' engines when TensorRT runs here (a refit engine kept open and switched),
    else ONNX Runtime (an elastic bundle's one decoder switched in place, or each level's graph)."""

    def __init__(self, path: Path, threads: int | None, pack: str):
        self.bundle = Bundle.open(path)
        self.path, self.threads = self.bundle.path, threads
        self.switcher = _Switcher(self.bundle.model_dir, threads, pack) if self.bundle.elastic else None
        self.engine, self.weights, self.verified = None, None, set()

    def folder(self, level: Level) -> Path:
        return self.bundle.folder(level)

    def level_errors(self, level: Level):
        files = tuple(sorted(self.bundle.level_files(level)))
        if files in self.verified:  # levels of an elastic bundle share their files: checked once
            return []
        errors = self.bundle.level_errors(level)
        if not errors:
            self.verified.add(files)
        return errors

    def decoder(self, level: Level, runtime: str):
        if runtime != "ort":
            from .trt.probe import tensorrt_status

            engine, _ = self.bundle.engine_for(level)
            ok, why = tensorrt_status()
            if runtime == "trt" and engine is None:
                raise UserError(f"level {level.name} has no engine in {self.path}: build it with build_engines.sh, "
                                "or use --runtime ort")
            if runtime == "trt" and not ok:
                raise UserError(f"cannot run TensorRT here: {why}")
            if engine is not None and ok:
                return self._trt(engine, level)
        rec = self.bundle.level_record(level)
        if self.switcher is not None:
            dec, seconds = self.switcher.serve(rec["index"], rec["name"])
            return dec, "onnxruntime", seconds
        from .ort import OrtDecoder

        return OrtDecoder(self.folder(level) / GRAPH_FILE, threads=self.threads), "onnxruntime", None

    def _trt(self, engine: Path, level: Level):
        from .trt.runtime import TrtDecoder
        from .trt.weights import default_levels

        if self.engine is not None and self.engine.engine_path == engine:  # a refit engine: switch it
            t0 = time.perf_counter()
            self.engine.set_level(level.name)
            return self.engine, "tensorrt", time.perf_counter() - t0
        self.engine = None
        gc.collect()  # one engine in device memory at a time (Jetson memory is shared with the CPU)
        specs, source = self.bundle.engines()
        spec = next((s for s in specs if Path(s.engine) == engine), None)
        if source is not None and self.weights is None:
            self.weights = default_levels(spec, source, self.threads)  # one weight builder for every engine
        weights = self.weights if source is not None else None
        self.engine = TrtDecoder(engine, level=level.name, weights=weights, threads=self.threads)
        return self.engine, "tensorrt", None


class Runner:
    """A bundle or an ONNX export folder, opened once, that generates at any of its levels in
    turn. An elastic bundle or a dynamic export keeps one session and switches it to each level
    (one weight build); a baked bundle or export opens each level's graph, TensorRT each engine
    (a refit engine once for its levels).

    ``fast_switch``: serve every level of an elastic model in place (a switch is one weight build,
    decoding about 0.8x a baked graph) instead of loading a packed session for a generation long
    enough to pay for it (``ElasticDecoder``'s "auto")."""

    def __init__(self, path: str | Path, runtime: str = "auto", threads: int | None = None, fast_switch: bool = False):
        if runtime not in RUNTIMES:
            raise UserError(f"unknown --runtime {runtime!r}: auto, trt or ort")
        check_threads(threads)
        p = Path(path)
        self.runtime, self.threads = runtime, threads
        pack = "never" if fast_switch else "auto"
        self.source = _ExportSource(p, threads, pack) if _manifest_format(p) == EXPORT.format else \
            _BundleSource(p, threads, pack)

    def check_levels(self, levels: list[Level]) -> None:
        """UserError naming the first level the source does not have: before the first one generates."""
        for level in levels:
            self.source.folder(level)

    def generate(self, level: Level, prompt: str, max_new_tokens: int = 64, on_text: Callable[[str], None] | None = None,
                 on_note: Callable[[str], None] | None = None) -> dict:
        """Greedy generation at ``level`` with the KV cache, streaming decoded text to ``on_text``.
        The level's files are hash-checked first (UserError, exit 3); a prompt longer than the
        model's context is refused and ``max_new_tokens`` is capped to what is left (said through
        ``on_note``). Returns tokens, text and timings (load or switch, prefill, tokens/s)."""
        from .ort import greedy

        if max_new_tokens < 1:
            raise UserError("--max-new-tokens must be >= 1")
        check_prompt(prompt)
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
        dec, used, switch_s = src.decoder(level, self.runtime)
        session = dec.prepare(max_new_tokens, len(ids)) if hasattr(dec, "prepare") else None
        ready_s = load_s = time.perf_counter() - t0  # until the generation starts, at its session's speed
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
                "session": session,  # an elastic model's: "packed" or "in place"; None for the others
                "pack_s": round(dec.pack_s, 3) if session == "packed" and switch_s is not None and dec.pack_s else None,
                "ready_s": round(ready_s, 3),
                "prefill_s": round(stamps[0] - start, 3) if stamps else None,
                "decode_tok_s": round((len(stamps) - 1) / decode_s, 2) if decode_s > 0 else None,
                "peak_rss_mb": peak_rss_mb(), "runtime": used}


def check_threads(threads: int | None) -> None:
    """UserError unless ``threads`` is None or 1 .. 4x this machine's cores (ONNX Runtime would try to start them all)."""
    import os

    most = 4 * (os.cpu_count() or 1)
    if threads is not None and not 1 <= threads <= most:
        raise UserError(f"--threads must be between 1 and {most} (4x this machine's {os.cpu_count()} cores), got {threads}")


def check_prompt(prompt: str) -> None:
    """UserError for a prompt that is not text (bytes that are not UTF-8 reach Python as surrogates)."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"--prompt holds bytes that are not UTF-8 text (at character {e.start}): pass text") from None


def run_levels(texts: list[str]) -> list[Level]:
    """The levels of ``--level`` options (comma lists, repeatable) in the order given, each once."""
    from .levels import parse_level

    out: list[Level] = []
    for text in texts:
        for part in (p for p in text.split(",") if p.strip()):
            level = parse_level(part)
            if level not in out:
                out.append(level)
    if not out:
        raise UserError("--level is empty: pass levels like 0.5,2:4")
    return out


def _manifest_format(path: Path) -> str | None:
    """The format named by a folder's manifest.json (None for anything else: a bundle archive, a
    missing or unreadable manifest, which Bundle.open then reports)."""
    m = path / "manifest.json"
    try:
        return load_json(m.read_bytes(), str(m)).get("format") if path.is_dir() and m.is_file() else None
    except (UserError, OSError, AttributeError):
        return None


def generate(path: str | Path, level: Level, prompt: str, max_new_tokens: int = 64,
             on_text: Callable[[str], None] | None = None, threads: int | None = None, runtime: str = "auto",
             on_note: Callable[[str], None] | None = None, fast_switch: bool = False) -> dict:
    """One generation from a bundle or export folder (``Runner.generate``)."""
    return Runner(path, runtime, threads, fast_switch).generate(level, prompt, max_new_tokens, on_text, on_note)


def peak_rss_mb() -> float | None:
    """This process's peak resident memory in MiB (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def describe(r: dict) -> str:
    """The one line printed after a generation."""
    how = f"switch {1e3 * r['switch_s']:.0f} ms" if r.get("switch_s") is not None else f"load {r['load_s']:.2f} s"
    if r.get("pack_s"):
        how += f" + packed session {r['pack_s']:.2f} s"
    if r.get("session"):
        how += f" ({r['session']})"
    rss = f", peak memory {r['peak_rss_mb']:.0f} MiB" if r.get("peak_rss_mb") else ""
    return (f"level {r['level']} on {r['runtime']}: {len(r['tokens'])} tokens, {how}, prefill {r['prefill_s']:.3f} s, "
            f"{r['decode_tok_s']} tokens/s{rss}")


def main(argv: list[str] | None = None, bundle: Path | None = None) -> int:
    """``run.py``'s command line; returns the exit code (1 bad input, 3 a file does not match)."""
    ap = argparse.ArgumentParser(prog="run.py", description="Generate text from this bundle (greedy, KV cache, streamed).")
    ap.add_argument("--level", required=True, action="append", help="level(s) to run, e.g. 0.5 or 0.5,2:4 (repeatable)")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--runtime", default="auto", choices=RUNTIMES)
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    ap.add_argument("--fast-switch", action="store_true",
                    help="serve every level of the elastic model in place: a switch is one weight build (the fastest), "
                         "but decoding is about 0.8x a baked graph's; by default a generation long enough to pay for "
                         "it gets a packed session (about a graph load) and decodes at a baked graph's speed")
    ap.add_argument("--bundle", type=Path, default=bundle, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    install_sigterm()
    try:
        levels = run_levels(args.level)
        check_prompt(args.prompt)
        runner = Runner(args.bundle, args.runtime, args.threads, fast_switch=args.fast_switch)
        runner.check_levels(levels)
        for lv in levels:
            r = runner.generate(lv, args.prompt, args.max_new_tokens, on_text=lambda s: print(s, end="", flush=True),
                                on_note=lambda s: print(f"note: {s}", file=sys.stderr))
            print()
            print(f"{describe(r)}; tokens {r['tokens']}", file=sys.stderr)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (install_sigterm): the temporary copy of a .tar.gz is removed on the way
        line, code = interrupted_line()
        print(f"error: {line}", file=sys.stderr)
        return code
    except OSError as e:
        print(f"error: {e.strerror or type(e).__name__}" + (f" ({e.filename})" if e.filename else ""), file=sys.stderr)
        return 1
    except Exception:
        if terminated():  # a signal inside an import comes out as ImportError
            line, code = interrupted_line()
            print(f"error: {line}", file=sys.stderr)
            return code
        raise


