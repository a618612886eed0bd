"""Optimization presets: strict TOML recipes from the top-level ``calibration/`` folder
(installed as the package ``epts_export.recipes``)."""

from __future__ import annotations

import tomllib
from importlib import resources

from ..errors import UserError

PRESET_KEYS = {"description": str, "calib": str, "nsamples": int, "seqlen": int, "epochs": int, "rank": int, "lr": float,
               "batch": int, "precision": str, "init": str, "steps": int, "check_windows": int, "residual": bool,
               "group_width": float, "warmup": int, "low_top": float, "low_span": float, "allocation": str}
DATA_FREE = ("self", "random")  # calibration sources that are not the user's text


# What text from the deployment domain bought over the model's own text (the `default` preset's
# calibration), SmolLM2-135M, 32 x 512 evaluation windows: the `default` preset (error allocation)
# against one EPTS run calibrated on 32 x 512 tokens of the corpus (error allocation), perplexity
# ratios. BENCHMARKS.md, "The data-free default" (python -m benchmarks.datafree).
DOMAIN_TEXT_GAIN = {"0.5": (1.20, 1.30), "0.7": (1.70, 3.08)}  # (Shakespeare, Docutils) ratios


def calibration_note(record) -> str | None:
    """What to tell a user whose artifact calibrated without text (``self`` or ``random``): what
    text from their domain would buy, measured. None for text calibration."""
    if not isinstance(record, dict) or record.get("kind") not in DATA_FREE:
        return None
    (a5, b5), (a7, b7) = DOMAIN_TEXT_GAIN["0.5"], DOMAIN_TEXT_GAIN["0.7"]
    what = "text the model sampled itself" if record.get("kind") == "self" else "random tokens"
    return (f"calibrated on {what} (no --calib). On SmolLM2-135M, text from the deployment domain gave {a5:.2f}-{b5:.2f}x "
            f"lower perplexity at 0.5 and {a7:.2f}-{b7:.2f}x at 0.7 (BENCHMARKS.md, \"The data-free default\"): "
            "pass --calib FILE (a few hundred KB of your text) to get it")


REQUIRED_KEYS = ("calib", "nsamples", "seqlen", "epochs", "rank", "lr")


def preset_for(preset: str | None, calib: str | None) -> str:
    """The preset a run uses: the one named, else ``text`` when --calib names text (a file, a
    folder, hf:NAME), else ``default`` (BENCHMARKS.md: each wins on its own calibration)."""
    if preset is not None:
        return preset
    return "text" if calib is not None and calib not in DATA_FREE else "default"


def check_calibration(preset: str, settings: dict, calib: str | None) -> None:
    """UserError when ``preset`` calibrates on the user's text (an empty ``calib``) and none is given."""
    if not (calib or settings["calib"]):
        raise UserError(f"preset {preset} calibrates on your own text: pass --calib FILE (a text file, a folder of "
                        ".txt/.md files or hf:NAME); for build, optimize with it first and build from the artifact")


def available() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("epts_export.recipes").iterdir() if p.name.endswith(".toml"))


def load_preset(name: str) -> dict:
    """The preset's settings; UserError for an unknown name (presets are names, never paths), an
    unknown or missing key or a wrong type."""
    if not isinstance(name, str) or name not in available():
        raise UserError(f"unknown preset {name!r}: available presets are {', '.join(available())}")
    f = resources.files("epts_export.recipes") / f"{name}.toml"
    if not f.is_file():
        raise UserError(f"unknown preset {name!r}: available presets are {', '.join(available())}")
    try:
        data = tomllib.loads(f.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"preset {name}: invalid TOML ({e})") from None
    for key, value in data.items():
        if key not in PRESET_KEYS:
            raise UserError(f"preset {name}: unknown key {key!r} (allowed: {', '.join(PRESET_KEYS)})")
        want = PRESET_KEYS[key]
        if want is float and isinstance(value, int):
            value = data[key] = float(value)
        if not isinstance(value, want) or (isinstance(value, bool) and want is not bool):
            raise UserError(f"preset {name}: {key} must be {want.__name__}, got {value!r}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise UserError(f"preset {name}: {', '.join(missing)} missing (a preset sets {', '.join(REQUIRED_KEYS)})")
    return data
