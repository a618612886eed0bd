"""The bytes of an elastic bundle against the baked levels it replaces (BENCHMARKS.md, "The elastic bundle").

    epts-export build --target jetson --out dist/           # the elastic bundle (six levels, fp16)
    python -m benchmarks.bundle_bytes dist/jetson-orin       # its ONNX files against one baked level

The baked level is exported from the bundle's own artifact (``source.artifact`` in its manifest),
in the bundle's precision; a baked-layout bundle of N levels holds N such folders. Prints a
markdown table and, with ``--json``, writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

ONNX = (".onnx", ".onnx_data")


def onnx_files(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name.endswith(ONNX)}


def main(argv: list[str] | None = None) -> int:
    from epts_export.core.levels import parse_level
    from epts_export.onnx.export import ExportSpec, export

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--level", default="0.5", help="the baked level to compare with")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    m = json.loads((args.bundle / "manifest.json").read_text())
    dtype = m["target"]["precision"]
    elastic = onnx_files(args.bundle)
    with tempfile.TemporaryDirectory() as tmp:
        out = export(ExportSpec(artifact=Path(m["source"]["artifact"]), out=Path(tmp) / "baked", mode="baked",
                                levels=[parse_level(args.level)], dtype=dtype))
        baked = onnx_files(out)
    one, total, n = sum(baked.values()), sum(elastic.values()), len(m["levels"])
    mb = 1e6
    print(f"| {m['layout']} bundle, {n} levels ({', '.join(r['name'] for r in m['levels'])}), {dtype} | bytes | x one baked level |")
    print("|---|---:|---:|")
    for name, size in elastic.items():
        print(f"| `{name}` | {size / mb:.1f} MB | {size / one:.3f} |")
    print(f"| **elastic, all {n} levels** | **{total / mb:.1f} MB** | **{total / one:.3f}** |")
    print(f"| one baked level ({args.level}) | {one / mb:.1f} MB | 1.000 |")
    print(f"| baked layout, {n} levels | {n * one / mb:.1f} MB | {n:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"elastic": elastic, "elastic_total": total, "baked_level": args.level,
                                         "baked": baked, "baked_total": one, "levels": n, "ratio": total / one}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
