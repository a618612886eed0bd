"""Optimize once, then serve several sparsity levels from the same artifact (Python API).

    python examples/elastic_levels.py [MODEL] [--quick]

MODEL defaults to the built-in smollm2-135m; --quick uses the smoke preset (a few minutes on CPU).
The same functions back `epts-export optimize / eval / materialize`.
"""

import sys
from pathlib import Path

from epts_export.core.levels import parse_level, parse_levels
from epts_export.artifact.materialize import ElasticModel
from epts_export.artifact.folder import Artifact
from epts_export.models.families import measured_sparsity
from epts_export.pruning.optimize import OptimizeSpec, optimize
from epts_export.progress import Progress

model = next((a for a in sys.argv[1:] if not a.startswith("-")), "smollm2-135m")
preset = "quick" if "--quick" in sys.argv else "default"
out = Path("runs/example-elastic")
if not (out / "manifest.json").exists():
    spec = OptimizeSpec.from_preset(model, out, parse_levels("0.3,0.5,0.7,2:4"), preset,
                                    resume=(out.parent / (out.name + ".partial")).exists())
    optimize(spec, progress=Progress())

em = ElasticModel(Artifact.open(out))  # loads the dense weights once
prompt = em.tokenizer("The quick brown fox", return_tensors="pt")
for name in ["0.3", "0.5", "0.62", "0.7", "2:4"]:  # 0.62 was never listed: any level in range works
    model = em.at(parse_level(name))  # re-merges the weights in place
    ids = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    text = em.tokenizer.decode(ids[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"{name:>5s}  sparsity {measured_sparsity(model):.3f}  {text!r}")
