"""Bad input, table-driven: one row per case. Each gets one `error: ...` line (no traceback), its
exit code, the text that must appear, and leaves nothing half-written (no .partial, .tmp or output).

A row's arguments are a function of the `ws` fixture (the workspace: a tiny artifact, an export, a
bundle, bad files), so the table reads as the commands a careless or hostile user would type.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

from epts_export.cli import app
from epts_export.core.levels import parse_levels
from epts_export.deploy.pipeline import BuildSpec, build
from epts_export.onnx.export import ExportSpec, export
from epts_export.pruning.optimize import optimize
from conftest import spec_for

runner = CliRunner()


@dataclass
class WS:
    root: Path
    model: Path  # a tiny LLaMA folder
    opt_model: Path  # a tiny OPT folder (max_position_embeddings 256)
    art: Path
    onnx: Path
    bundle: Path
    text: Path

    def copy(self, what: Path, name: str) -> Path:
        dest = self.root / name
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(what, dest)
        return dest

    def file(self, name: str, data: bytes | str) -> Path:
        p = self.root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        return p

    def manifest(self, what: Path, name: str, edit: Callable[[dict], object]) -> Path:
        """A copy of ``what`` whose manifest.json was changed in place by ``edit(manifest)``."""
        dest = self.copy(what, name)
        m = json.loads((dest / "manifest.json").read_text())
        edit(m)
        (dest / "manifest.json").write_text(json.dumps(m))
        return dest

    def raw_manifest(self, what: Path, name: str, data: bytes) -> Path:
        dest = self.copy(what, name)
        (dest / "manifest.json").write_bytes(data)
        return dest

    def tar(self, name: str, add: Callable[[tarfile.TarFile], None], compress: bool = True) -> Path:
        p = self.root / name
        with tarfile.open(p, "w:gz" if compress else "w") as t:
            add(t)
        return p


@pytest.fixture(scope="module")
def ws(tiny_dirs, text_file, tmp_path_factory) -> WS:
    root = tmp_path_factory.mktemp("bad")
    art = optimize(spec_for(tiny_dirs["llama"], root / "art", text_file, levels="0.5,2:4"))
    onnx = export(ExportSpec(artifact=art, out=root / "onnx", levels=parse_levels("0.5")))
    bundle = build(BuildSpec(source=str(art), target="rtx", out=root / "dist", levels=parse_levels("0.5,2:4")))
    return WS(root, tiny_dirs["llama"], tiny_dirs["opt"], art, onnx, bundle, text_file)


def _calib_changed(ws: WS) -> Path:
    """A copy of the artifact whose recorded calibration text no longer hashes the same."""
    text = ws.file("calib-moved.txt", ws.text.read_text() + " more")
    return ws.manifest(ws.art, "a-calib", lambda m: m["calibration"].update(source=str(text)))


def _truncated_model(ws: WS) -> Path:
    d = ws.copy(ws.model, "model-truncated")
    f = next(d.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:1000])
    return d


def _tar_with_extra(ws: WS, name: str, extra: Callable[[tarfile.TarFile], None]) -> Path:
    def add(t):
        t.add(ws.bundle, arcname="rtx-ada")
        extra(t)
    return ws.tar(name, add)


def _add_bytes(t: tarfile.TarFile, name: str, data: bytes) -> None:
    import io

    info = tarfile.TarInfo(name)
    info.size = len(data)
    t.addfile(info, io.BytesIO(data))


def _truncated_tar(ws: WS) -> Path:
    p = _tar_with_extra(ws, "whole.tar.gz", lambda t: None)
    cut = ws.root / "truncated.tar.gz"
    cut.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return cut


def _two_bundles(ws: WS) -> Path:
    def add(t):
        t.add(ws.bundle, arcname="a")
        t.add(ws.bundle, arcname="b")
    return ws.tar("two.tar.gz", add)


def _read_only_dir(ws: WS) -> Path:
    d = ws.root / "ro"
    d.mkdir(exist_ok=True)
    return d


# (id, argv(ws), exit code, text that must appear, extra paths that must not exist afterwards)
ROWS = [
    # --- artifacts and manifests
    ("info: not a folder", lambda ws: ["info", ws.file("x.txt", "hi")], 1, "is a file", []),
    ("info: manifest not UTF-8", lambda ws: ["info", ws.raw_manifest(ws.art, "a-bin", b"\xff\xfe{")], 1, "not UTF-8", []),
    ("info: manifest a list", lambda ws: ["info", ws.raw_manifest(ws.art, "a-list", b"[1, 2]")], 1, "not an epts-export artifact", []),
    ("info: manifest without groups", lambda ws: ["info", ws.manifest(ws.art, "a-nogroups", lambda m: m.pop("groups"))], 1,
     "'groups' is missing", []),
    ("info: groups of the wrong type", lambda ws: ["info", ws.manifest(ws.art, "a-groups-str", lambda m: m.update(groups="x"))], 1,
     "'groups' must be a list", []),
    ("info: empty groups", lambda ws: ["info", ws.manifest(ws.art, "a-groups-empty", lambda m: m.update(groups=[]))], 1,
     "needs its sparsity groups", []),
    ("info: malformed level", lambda ws: ["info", ws.manifest(ws.art, "a-abc", lambda m: m.update(levels=["abc"]))], 1,
     "malformed levels", []),
    ("materialize: malformed level", lambda ws: ["materialize", ws.manifest(ws.art, "a-abc2", lambda m: m.update(levels=["abc"])),
                                                 "--level", "0.5", "--out", ws.root / "m-abc"], 1, "malformed levels", ["m-abc"]),
    ("info: schema 99", lambda ws: ["info", ws.manifest(ws.art, "a-99", lambda m: m.update(schema_version=99))], 1,
     "newer than the version 1", []),
    ("info: settings without rank", lambda ws: ["info", ws.manifest(ws.art, "a-norank", lambda m: m["settings"].pop("rank"))], 1,
     "training configuration", []),
    ("optimize: truncated safetensors", lambda ws: ["optimize", _truncated_model(ws), "--out", ws.root / "o-trunc", "--calib",
                                                    ws.text, "--nsamples", 2, "--seqlen", 16, "-q"], 1, "could not load model", ["o-trunc"]),
    # --- numbers
    ("optimize: --lr -1", lambda ws: ["optimize", ws.model, "--out", ws.root / "o-lr", "--lr", "-1", "-q"], 1,
     "--lr must be a positive number", ["o-lr"]),
    ("optimize: --lr nan", lambda ws: ["optimize", ws.model, "--out", ws.root / "o-nan", "--lr", "nan", "-q"], 1,
     "--lr must be a positive number", ["o-nan"]),
    ("optimize: seqlen past the context", lambda ws: ["optimize", ws.opt_model, "--out", ws.root / "o-ctx", "--calib", ws.text,
                                                     "--nsamples", 1, "--seqlen", 1024, "-q"], 1, "context of 256", ["o-ctx"]),
    ("eval: --max-windows -1", lambda ws: ["eval", ws.art, "--data", ws.text, "--max-windows", "-1"], 1, "--max-windows must be >= 1", []),
    ("eval: --max-windows 0", lambda ws: ["eval", ws.art, "--data", ws.text, "--max-windows", "0"], 1, "--max-windows must be >= 1", []),
    ("eval: seqlen past an OPT context", lambda ws: ["eval", ws.opt_model, "--data", ws.text, "--seqlen", 1024], 1, "context of 256", []),
    ("eval: seqlen past a LLaMA context", lambda ws: ["eval", ws.art, "--data", ws.text, "--seqlen", 1024], 1, "context of 256", []),
    ("eval: binary data", lambda ws: ["eval", ws.art, "--data", ws.file("bin.dat", bytes(range(256)) * 8), "--seqlen", 64], 1,
     "not UTF-8 text (invalid byte at offset 128)", []),
    ("optimize: binary calibration", lambda ws: ["optimize", ws.model, "--out", ws.root / "o-bin", "--calib",
                                                ws.file("bin2.dat", b"ab\xff" * 999), "--seqlen", "64", "-q"], 1, "not UTF-8 text",
                                                ["o-bin"]),
    # --- levels
    ("materialize: two levels", lambda ws: ["materialize", ws.art, "--level", "0.5,0.6", "--out", ws.root / "m-two"], 1,
     "one level per folder", ["m-two"]),
    ("materialize: empty --level", lambda ws: ["materialize", ws.art, "--level", "", "--out", ws.root / "m-empty"], 1,
     "--level is empty", ["m-empty"]),
    ("build: empty --levels", lambda ws: ["build", ws.art, "--target", "rtx", "--out", ws.root / "d-empty", "--levels", ""], 1,
     "--levels is empty", ["d-empty/rtx-ada"]),
    ("run: empty --level", lambda ws: ["run", ws.bundle, "--level", "", "--prompt", "w1"], 1, "--level is empty", []),
    ("run: level not in the bundle", lambda ws: ["run", ws.bundle, "--level", "0.7", "--prompt", "Hello"], 1, "not in bundle", []),
    ("optimize: level 'abc'", lambda ws: ["optimize", ws.model, "--out", ws.root / "o-abc", "--levels", "abc", "-q"], 1,
     "malformed level 'abc'", ["o-abc"]),
    ("optimize: level 1:1", lambda ws: ["optimize", ws.model, "--out", ws.root / "o-11", "--levels", "1:1", "-q"], 1,
     "N:M needs 0 < N < M", ["o-11"]),
    ("optimize: level 95%", lambda ws: ["optimize", ws.model, "--out", ws.root / "o-95", "--levels", "95%", "-q"], 1,
     "out of range", ["o-95"]),
    ("build: unknown target", lambda ws: ["build", ws.art, "--target", "tpu-v5", "--out", ws.root / "d-tpu"], 1,
     "unknown target 'tpu-v5'", ["d-tpu"]),
    ("export: level above the range", lambda ws: ["export", ws.art, "--out", ws.root / "x-high", "--levels", "0.8"], 1,
     "above the trained range", ["x-high"]),
    ("export: int8 in dynamic mode", lambda ws: ["export", ws.art, "--out", ws.root / "x-i8d", "--dtype", "int8", "--mode", "dynamic"],
     1, "int8 exports are baked", ["x-i8d"]),
    ("export: --smooth without int8", lambda ws: ["export", ws.art, "--out", ws.root / "x-sm", "--smooth", "0.5"], 1,
     "go with --dtype int8", ["x-sm"]),
    ("export: --smooth 1.5", lambda ws: ["export", ws.art, "--out", ws.root / "x-sm2", "--dtype", "int8", "--smooth", "1.5"], 1,
     "--smooth 1.5 is out of range", ["x-sm2"]),
    ("export: int8, calibration text changed", lambda ws: ["export", _calib_changed(ws), "--out", ws.root / "x-cc", "--dtype", "int8"],
     1, "changed since the artifact was optimized", ["x-cc"]),
    ("export: int8, --calib too short", lambda ws: ["export", ws.art, "--out", ws.root / "x-cs", "--dtype", "int8", "--calib",
                                                   ws.file("short.txt", "the cat sat")], 1, "too short for the INT8 ranges", ["x-cs"]),
    # --- outputs
    ("materialize: --out under a file", lambda ws: ["materialize", ws.art, "--level", "0.5", "--out", ws.file("f1", "x") / "sub"], 1,
     "is a file, not a folder", []),
    ("materialize: --out is a file", lambda ws: ["materialize", ws.art, "--level", "0.5", "--out", ws.file("f2", "x"), "--overwrite"], 1,
     "is a file: give the path of a folder", []),
    ("export: --out equal to the input", lambda ws: ["export", ws.copy(ws.art, "a-self"), "--out", ws.root / "a-self", "--overwrite"], 1,
     "would overwrite or nest inside the input", []),
    ("materialize: --out inside the input", lambda ws: ["materialize", ws.art, "--level", "0.5", "--out", ws.art / "model" / "x"], 1,
     "would overwrite or nest inside the input", []),
    ("optimize: --out exists", lambda ws: ["optimize", ws.model, "--out", ws.art, "-q"], 1, "already exists", []),
    ("eval: --json is a folder", lambda ws: ["eval", ws.art, "--data", ws.text, "--json", ws.root], 1, "is a folder", []),
    ("validate: --report is a folder", lambda ws: ["validate", ws.onnx, "--report", ws.root], 1, "--report", []),
    ("validate: --junit under a file", lambda ws: ["validate", ws.onnx, "--junit", ws.file("f3", "x") / "j.xml"], 1, "is a file", []),
    # --- build
    ("build: missing --eval-data", lambda ws: ["build", ws.art, "--target", "rtx", "--out", ws.root / "d-ev", "--eval-data",
                                               ws.root / "nope.txt"], 1, "evaluation text not found", ["d-ev/rtx-ada"]),
    ("build: bf16 target", lambda ws: ["build", ws.art, "--target", ws.file("bf16/rtx-ada.toml", _bf16_target()),
                                       "--out", ws.root / "d-bf16"], 1, "bf16 is not supported yet", ["d-bf16/rtx-ada"]),
    # --- bundles
    ("verify: a file the manifest does not list", lambda ws: ["verify", _with_file(ws, "b-injected", "tensorrt.py", "import os")], 3,
     "tensorrt.py is not listed", []),
    ("verify: schema 42", lambda ws: ["verify", ws.manifest(ws.bundle, "b-42", lambda m: m.update(schema_version=42))], 1,
     "newer than the version 2", []),
    ("verify: levels of the wrong type", lambda ws: ["verify", ws.manifest(ws.bundle, "b-lv", lambda m: m.update(levels={}))], 3,
     "'levels' must be a list", []),
    ("verify: tar member not in the manifest", lambda ws: ["verify", _tar_with_extra(
        ws, "extra.tar.gz", lambda t: _add_bytes(t, "rtx-ada/tensorrt.py", b"import os"))], 3, "is not listed", []),
    ("verify: tar with a large unlisted member", lambda ws: ["verify", _tar_with_extra(
        ws, "big.tar.gz", lambda t: _add_bytes(t, "rtx-ada/pad.bin", bytes(8 << 20)))], 3, "pad.bin' is not listed", []),
    ("verify: truncated tar", lambda ws: ["verify", _truncated_tar(ws)], 3, "truncated or corrupted", []),
    ("verify: two bundles in one tar", lambda ws: ["verify", _two_bundles(ws)], 3, "holds 2 bundles", []),
    ("run: a swapped weight builder", lambda ws: ["run", _with_file(ws, "b-swapped", "model/weights.onnx", "not a graph"),
                                                  "--level", "0.5", "--prompt", "w1"], 3, "does not match its sha256", []),
    ("run: a swapped decoder", lambda ws: ["run", _with_file(ws, "b-swapped-dec", "model/decoder.onnx", "not a graph"),
                                           "--level", "2:4", "--prompt", "w1"], 3, "model/decoder.onnx does not match", []),
    ("run: a level record outside the bundle", lambda ws: ["run", ws.manifest(ws.bundle, "b-out", lambda m: m["levels"][0].update(
        dir="../x")), "--level", "0.5", "--prompt", "w1"], 3, "must be a path inside the folder", []),
    ("run: a duplicated level record", lambda ws: ["run", ws.manifest(ws.bundle, "b-dup", lambda m: m["levels"].append(
        dict(m["levels"][-1]))), "--level", "0.5", "--prompt", "w1"], 3, "is listed twice", []),
    ("build: an unknown layout", lambda ws: ["build", ws.art, "--target", "rtx", "--out", ws.root / "d-layout", "--layout",
                                             "zip", "--quiet"], 1, "unknown --layout 'zip'", []),
    ("run: prompt past the context", lambda ws: ["run", ws.bundle, "--level", "0.5", "--prompt", " ".join(["w1"] * 400)], 1,
     "context is 256", []),
    # --- issue 26: the manifest is the root of trust
    ("verify: a listed file outside the folder", lambda ws: ["verify", ws.manifest(ws.bundle, "b-host", lambda m: m["files"].update(
        {"/etc/hostname": "0" * 64}))], 3, "the listed file '/etc/hostname' must be a path inside the folder", []),
    ("info: a listed file that climbs out", lambda ws: ["info", ws.manifest(ws.art, "a-climb", lambda m: m["files"].update(
        {"../../etc/passwd": "0" * 64}))], 1, "must be a path inside the folder", []),
    ("verify: a symlinked tokenizer", lambda ws: ["verify", _linked(ws, "b-link", "model/tokenizer.json", "/etc/passwd")], 3,
     "model/tokenizer.json is or lies under a symbolic link", []),
    ("run: a symlinked tokenizer", lambda ws: ["run", _linked(ws, "b-link2", "model/tokenizer.json", "/etc/passwd"),
                                               "--level", "0.5", "--prompt", "w1"], 3, "symbolic link", []),
    ("verify: an unlisted FIFO", lambda ws: ["verify", _with_fifo(ws, "b-fifo", "model/extra")], 3,
     "model/extra is not listed", []),
    ("run: an unlisted file beside the graphs", lambda ws: ["run", _with_file(ws, "b-extra", "model/extra.onnx_data", "x"),
                                                            "--level", "0.5", "--prompt", "w1"], 3, "model/extra.onnx_data is not listed", []),
    ("run: an export whose graph is not listed", lambda ws: ["run", ws.manifest(ws.onnx, "x-nograph", lambda m: m["files"].pop(
        "level-0.5/model.onnx")), "--level", "0.5", "--prompt", "w1"], 3, "does not list level-0.5/model.onnx", []),
    ("run: the decoder not listed", lambda ws: ["run", ws.manifest(ws.bundle, "b-nodec", lambda m: m["files"].pop(
        "model/decoder.onnx")), "--level", "0.5", "--prompt", "w1"], 3, "does not list model/decoder.onnx", []),
    ("verify: target without a name", lambda ws: ["verify", ws.manifest(ws.bundle, "b-target", lambda m: m.update(target={}))], 3,
     "target: 'name' is missing", []),
    ("verify: a deeply nested manifest", lambda ws: ["verify", ws.raw_manifest(ws.bundle, "b-deep", b"[" * 50000 + b"]" * 50000)],
     3, "nests too deeply", []),
    ("info: a deeply nested manifest", lambda ws: ["info", ws.raw_manifest(ws.art, "a-deep", b"{\"a\":" * 20000 + b"1" +
                                                                             b"}" * 20000)], 1, "nests too deeply", []),
    ("verify: Infinity in engines.json", lambda ws: ["verify", _rehashed(ws, "b-inf", "engines.json", (
        ws.bundle / "engines.json").read_bytes().replace(b'"version": 3', b'"version": Infinity'))], 1,
     "Infinity is not a JSON number", []),
    ("run: a tokenizer that is not JSON", lambda ws: ["run", _rehashed(ws, "b-tok", "model/tokenizer.json", b"not json"),
                                                      "--level", "0.5", "--prompt", "w1"], 3, "is not a tokenizer", []),
    ("run: a config that is a list", lambda ws: ["run", _rehashed(ws, "b-conf", "model/config.json", b"[1]"),
                                                 "--level", "0.5", "--prompt", "w1"], 3, "is not a JSON object", []),
    ("run: the weight builder as the decoder", lambda ws: ["run", _rehashed(ws, "b-dec", "model/decoder.onnx", (
        ws.bundle / "model" / "weights.onnx").read_bytes()), "--level", "0.5", "--prompt", "w1"], 3, "decoder", []),
    # --- report files and output folders
    ("eval: --json a symlink", lambda ws: ["eval", ws.art, "--data", ws.text, "--json", _symlink(ws, "j-link", "target.txt")], 1,
     "is a symbolic link", []),
    ("validate: --report a FIFO", lambda ws: ["validate", ws.onnx, "--report", _fifo(ws, "r-fifo")], 1, "is not a regular file", []),
    ("eval: --plot a symlink", lambda ws: ["eval", ws.art, "--data", ws.text, "--plot", _symlink(ws, "p-link.png", "t.png")], 1,
     "is a symbolic link", []),
    ("materialize: --out a symlink", lambda ws: ["materialize", ws.art, "--level", "0.5", "--out", _symlink(ws, "m-link", "m-real"),
                                                 "--overwrite"], 1, "is a symbolic link", ["m-real"]),
    ("export: --out a 250-byte name", lambda ws: ["export", ws.art, "--out", ws.root / ("x" * 250)], 1, "the name is 250 bytes", []),
    ("materialize: --out '~/x' unexpanded", lambda ws: ["materialize", ws.art, "--level", "0.5", "--out", "~/m-tilde"], 1,
     "'~' was not expanded", []),
    ("build: .stages/.lock a folder", lambda ws: ["build", ws.art, "--target", "rtx", "--out", _lock_dir(ws), "-q"], 1,
     "is in the way", []),
    # --- inputs of the wrong kind
    ("optimize: a FIFO as the .gguf", lambda ws: ["optimize", _fifo(ws, "m.gguf"), "--out", ws.root / "o-fifo", "-q"], 1,
     "not a regular file or a folder", ["o-fifo"]),
    ("eval: a FIFO as --data", lambda ws: ["eval", ws.art, "--data", _fifo(ws, "d-fifo.txt"), "--seqlen", 64], 1,
     "not a regular file", []),
    ("eval: text with NUL bytes", lambda ws: ["eval", ws.art, "--data", ws.file("nul.txt", "w1 \x00 w2 " * 200), "--seqlen", 64], 1,
     "holds NUL bytes", []),
    ("run: a prompt that is not UTF-8", lambda ws: ["run", ws.bundle, "--level", "0.5", "--prompt", "w1 \udcff"], 1,
     "not UTF-8 text", []),
    ("run: an unknown level after a good one", lambda ws: ["run", ws.bundle, "--level", "0.5,0.9", "--prompt", "w1"], 1,
     "level 0.9 is not in bundle", []),
    ("optimize: a preset given as a path", lambda ws: ["optimize", ws.model, "--out", ws.root / "o-pre", "--preset",
                                                       "../../tmp/evil", "-q"], 1, "unknown preset", ["o-pre"]),
    ("build: an unknown preset", lambda ws: ["build", ws.model, "--target", "rtx", "--out", ws.root / "d-pre", "--preset",
                                             "nope", "-q"], 1, "unknown preset", ["d-pre"]),
    ("build: the text preset (build has no --calib)", lambda ws: ["build", ws.model, "--target", "rtx", "--out",
                                                                  ws.root / "d-txt", "--preset", "text", "-q"], 1,
     "preset text calibrates on your own text", ["d-txt"]),
    # --- numbers without bounds
    ("optimize: --seed 2**70", lambda ws: ["optimize", ws.model, "--out", ws.root / "o-seed", "--seed", str(2**70), "-q"], 1,
     "--seed must be between 0 and 2**63 - 1", ["o-seed"]),
    ("optimize: --threads -1", lambda ws: ["optimize", ws.model, "--out", ws.root / "o-thr", "--threads", "-1", "-q"], 1,
     "--threads must be between 1", ["o-thr"]),
    ("run: --threads 100000", lambda ws: ["run", ws.bundle, "--level", "0.5", "--prompt", "w1", "--threads", "100000"], 1,
     "--threads must be between 1", []),
    ("optimize: --host-memory 1e300", lambda ws: ["optimize", ws.model, "--out", ws.root / "o-mem", "--host-memory", "1e300",
                                                  "--dry-run"], 1, "--host-memory must be a positive number of GiB", []),
    ("optimize: --steps 10**12", lambda ws: ["optimize", ws.model, "--out", ws.root / "o-steps", "--steps", str(10**12), "-q"], 1,
     "--steps must be at most 1,000,000", ["o-steps"]),
    ("optimize: --warmup past --steps", lambda ws: ["optimize", ws.model, "--out", ws.root / "o-warm", "--steps", "2",
                                                    "--warmup", "5", "-q"], 1, "--warmup (5) must not exceed --steps (2)", ["o-warm"]),
    ("eval: --step 1e-9", lambda ws: ["eval", ws.art, "--data", ws.text, "--plot", ws.root / "c.png", "--step", "1e-9"], 1,
     "--step must be between 0.01 and 0.5", []),
    # --- layer-wise allocation
    ("optimize: --allocation bogus", lambda ws: ["optimize", ws.model, "--out", ws.root / "o-al", "--allocation", "owls", "-q"], 1,
     "--allocation must be uniform, owl[:LAMBDA[,M]] or error[:LAMBDA]", ["o-al"]),
    ("optimize: --allocation owl:0.5 (masks would not nest)", lambda ws: ["optimize", ws.model, "--out", ws.root / "o-al5",
                                                                         "--allocation", "owl:0.5", "-q"], 1,
     "LAMBDA must be in (0, 0.125]", ["o-al5"]),
    ("optimize: --allocation owl with magnitude", lambda ws: ["optimize", ws.model, "--out", ws.root / "o-alm", "--method",
                                                             "magnitude", "--levels", "0.5", "--allocation", "owl", "-q"], 1,
     "--method magnitude has none", ["o-alm"]),
    ("info: allocation offsets past the ramp", lambda ws: ["info", ws.manifest(ws.art, "a-alloc", lambda m: m.update(
        allocation={"method": "owl", "ramp": 0.25, "offsets": [0.3, -0.3]}))], 1, "malformed allocation", []),
    ("info: allocation for another block count", lambda ws: ["info", ws.manifest(ws.art, "a-alloc2", lambda m: m.update(
        allocation={"method": "owl", "ramp": 0.25, "offsets": [0.1, 0.0, -0.1]}))], 1, "3 offsets for 2 blocks", []),
    ("optimize: diverging --lr 1e30", lambda ws: ["optimize", ws.model, "--out", ws.root / "o-div", "--calib", ws.text,
                                                  "--nsamples", 2, "--seqlen", 16, "--levels", "0.5", "--lr", "1e30", "-q"], 1,
     "training diverged", ["o-div"]),
]


def _rehashed(ws: WS, name: str, rel: str, data: bytes) -> Path:
    """A bundle copy whose ``rel`` holds ``data`` and whose manifest lists its new sha256 (a
    consistent folder of the wrong contents)."""
    import hashlib

    b = ws.copy(ws.bundle, name)
    (b / rel).write_bytes(data)
    m = json.loads((b / "manifest.json").read_text())
    m["files"][rel] = hashlib.sha256(data).hexdigest()
    (b / "manifest.json").write_text(json.dumps(m))
    return b


def _linked(ws: WS, name: str, rel: str, target: str) -> Path:
    b = _rehashed(ws, name, rel, Path(target).read_bytes())
    (b / rel).unlink()
    (b / rel).symlink_to(target)
    return b


def _with_fifo(ws: WS, name: str, rel: str) -> Path:
    b = ws.copy(ws.bundle, name)
    os.mkfifo(b / rel)
    return b


def _fifo(ws: WS, name: str) -> Path:
    p = ws.root / name
    if not p.exists():
        os.mkfifo(p)
    return p


def _symlink(ws: WS, name: str, target: str) -> Path:
    p = ws.root / name
    if p.is_symlink():
        p.unlink()
    p.symlink_to(ws.root / target)
    return p


def _lock_dir(ws: WS) -> Path:
    out = ws.root / "d-lockdir"
    (out / ".stages" / ".lock").mkdir(parents=True, exist_ok=True)
    return out


def _with_file(ws: WS, name: str, rel: str, text: str) -> Path:
    b = ws.copy(ws.bundle, name)
    (b / rel).write_text(text)
    return b


def _bf16_target() -> str:
    from epts_export.deploy.targets import targets_dir

    return (targets_dir() / "rtx-ada.toml").read_text().replace('precision = "fp16"', 'precision = "bf16"')


@pytest.mark.parametrize("case, argv, code, text, absent", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input(ws, case, argv, code, text, absent):
    before = {p for p in ws.root.rglob("*") if p.name.endswith((".partial", ".tmp"))}
    r = runner.invoke(app, [str(a) for a in argv(ws)])
    out = " ".join(r.output.split())
    assert r.exit_code == code, f"{case}: exit {r.exit_code}\n{r.output}\n{r.exception!r}"
    assert text in out, f"{case}: {r.output}"
    assert "Traceback" not in r.output and "error:" in out and out.count("error:") == 1, r.output
    assert not isinstance(r.exception, Exception) or isinstance(r.exception, SystemExit), repr(r.exception)
    stray = {p for p in ws.root.rglob("*") if p.name.endswith((".partial", ".tmp")) or ".tmp." in p.name} - before
    assert not stray, stray
    for rel in absent:
        assert not (ws.root / rel).exists(), rel


def test_the_table_counts_what_the_readme_says():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert f"{len(ROWS)} cases" in readme, f"README's reliability paragraph should say {len(ROWS)} cases"


def test_read_only_output_folder(ws, monkeypatch):
    """root writes anywhere, so the permission check is exercised through os.access."""
    ro = _read_only_dir(ws)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ro else real(p, mode))
    r = runner.invoke(app, ["materialize", str(ws.art), "--level", "0.5", "--out", str(ro / "m")])
    assert r.exit_code == 1 and "permission denied" in " ".join(r.output.split()), r.output
    assert not (ro / "m").exists() and not (ro / "m.partial").exists()


def test_concurrent_builds_into_one_out_wait_for_the_lock_then_reuse(ws, tmp_path):
    """Two builds into the same --out at once: while another holds the stage lock both wait (and
    say so) and write nothing; released, they take turns and the second reuses the first's stages."""
    import fcntl
    import subprocess
    import sys
    import time

    out = ws.root / "d-race"
    (out / ".stages").mkdir(parents=True)
    code = ("import sys; from epts_export.deploy.pipeline import BuildSpec, build; from epts_export.core.levels import parse_levels;"
            "from epts_export.progress import Progress;"
            f"build(BuildSpec(source={str(ws.art)!r}, target=sys.argv[1], out={str(out)!r}, levels=parse_levels('0.5')),"
            " Progress(enabled=True))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "COLUMNS": "200"}
    logs = [tmp_path / f"{t}.log" for t in ("rtx-ada", "hopper")]
    with open(out / ".stages" / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        procs = [subprocess.Popen([sys.executable, "-c", code, log.stem], env=env, stdout=log.open("w"),
                                  stderr=subprocess.STDOUT) for log in logs]
        deadline = time.time() + 300
        while not all("waiting for another build" in log.read_text() for log in logs):
            assert time.time() < deadline and all(p.poll() is None for p in procs), [log.read_text() for log in logs]
            time.sleep(0.2)
        time.sleep(1)  # still waiting a second later: nothing written, nobody finished
        assert all(p.poll() is None for p in procs)
        assert sorted(p.name for p in (out / ".stages").iterdir()) == [".lock"]
    assert [p.wait(timeout=600) for p in procs] == [0, 0], [log.read_text() for log in logs]
    assert (out / "rtx-ada" / "manifest.json").is_file() and (out / "hopper" / "manifest.json").is_file()
    assert len([p for p in (out / ".stages").iterdir() if p.name.startswith("onnx-")]) == 1


def test_bundle_scripts_import_nothing_added_beside_them(ws, tmp_path):
    """A tensorrt.py (or epts_export/) dropped next to build_engines.py or run.py is never imported."""
    import subprocess
    import sys

    b = ws.copy(ws.bundle, "b-scripts")
    marker = tmp_path / "imported"
    for name in ("tensorrt.py", "tensorrt_bindings.py", "onnxruntime.py"):
        (b / name).write_text(f"open({str(marker)!r}, 'w').write('{name}')\n")
    (b / "epts_export").mkdir()
    (b / "epts_export" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('epts_export')\n")
    r = subprocess.run([sys.executable, str(b / "build_engines.py")], capture_output=True, text=True, cwd=b)
    assert r.returncode == 1 and "cannot build engines here" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, str(b / "run.py"), "--level", "0.5", "--prompt", "w1", "--max-new-tokens", "2"],
                       capture_output=True, text=True, cwd=b)
    assert r.returncode == 0, r.stderr
    assert not marker.exists(), marker.read_text()
    r = runner.invoke(app, ["verify", str(b)])
    assert r.exit_code == 3 and "tensorrt.py is not listed" in " ".join(r.output.split())


def test_resume_with_a_truncated_checkpoint(ws, tmp_path):
    from epts_export.errors import UserError

    out = tmp_path / "art"

    def interrupt(i):
        raise KeyboardInterrupt

    with pytest.raises(UserError):
        optimize(spec_for(ws.model, out, ws.text, levels="0.5"), on_block_done=interrupt)
    block = next((tmp_path / "art.partial" / "ckpt").glob("block_*.safetensors"))
    block.write_bytes(block.read_bytes()[:100])
    streams = tmp_path / "art.partial" / "ckpt" / "streams.safetensors"
    streams.write_bytes(streams.read_bytes()[:100])
    with pytest.raises(UserError, match="unreadable.*delete"):
        optimize(spec_for(ws.model, out, ws.text, levels="0.5", resume=True))
    assert not out.exists()
