"""Compare two `build --out` folders file by file: is a refactor's output bit-identical?

    python -m benchmarks.compare_builds BEFORE/dist AFTER/dist

Every file of both trees (stages included) is compared byte for byte, except what records a time
or the host: JSON is compared without its times, creation stamps, free memory and the hashes that
follow from them; a .safetensors file by its header and tensor bytes (the writer orders its
metadata map at random); an ONNX graph without its source-manifest hash metadata (that manifest
holds a creation time). Stage folders are named by a fingerprint of such a hash, so names are
compared with the fingerprint masked. Prints what differs; exit 1 when anything does.
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import sys
from pathlib import Path

VOLATILE = {"elapsed_s", "export_seconds", "validated_at", "switch_s", "time", "timings", "created",
            "host_available_bytes", "files", "manifest_sha256", "artifact_manifest_sha256", "source_manifest_sha256",
            "refit_s", "build_s", "load_s", "prefill_s", "decode_tok_s", "repack_s", "file_sizes", "onnx_bytes"}
STAGE = re.compile(r"(artifact|onnx|parity)-[0-9a-f]{16}")


def _strip(o):
    if isinstance(o, dict):
        return {k: _strip(v) for k, v in o.items() if k not in VOLATILE}
    if isinstance(o, list):
        return [_strip(v) for v in o]
    if isinstance(o, str):
        return STAGE.sub(r"\1-KEY", o)
    return o


def _safetensors(b: bytes):
    n = struct.unpack("<Q", b[:8])[0]
    return json.loads(b[8:8 + n]), b[8 + n:]


def _onnx_graph(path: Path) -> bytes:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    keep = [x for x in m.metadata_props if x.key != "epts.source_manifest_sha256"]
    del m.metadata_props[:]
    m.metadata_props.extend(keep)
    return m.SerializeToString()


def _files(root: Path) -> dict[str, Path]:
    return {STAGE.sub(r"\1-KEY", p.relative_to(root).as_posix()): p
            for p in root.rglob("*") if p.is_file() and ".lock" not in p.name}


def same(a: Path, b: Path) -> bool:
    x, y = a.read_bytes(), b.read_bytes()
    if x == y:
        return True
    if a.suffix == ".json":
        return _strip(json.loads(x)) == _strip(json.loads(y))
    if a.suffix == ".safetensors":
        return _safetensors(x) == _safetensors(y)
    if a.suffix == ".onnx":
        return _onnx_graph(a) == _onnx_graph(b)
    return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    args = ap.parse_args(argv)
    fa, fb = _files(args.before), _files(args.after)
    only = sorted(set(fa) ^ set(fb))
    differ = [f for f in sorted(set(fa) & set(fb)) if not same(fa[f], fb[f])]
    for f in only:
        print(f"only in {'before' if f in fa else 'after'}: {f}")
    for f in differ:
        print(f"differs: {f}")
    print(f"{len(set(fa) & set(fb))} files in both; {len(differ)} differ; {len(only)} in one only")
    return 1 if differ or only else 0


if __name__ == "__main__":
    sys.exit(main())
