"""Device target profiles (targets/*.toml): every shipped file is valid, and bad files fail with
one line naming the file and the field. Pure TOML work: no models, runs in well under a second."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from epts_export.errors import UserError
from epts_export.core.levels import DEFAULT_LEVELS, parse_levels
from epts_export.device.interface import ShapeRange
from epts_export.deploy.targets import (
    ENV_DIR,
    FIELDS,
    all_targets,
    load_target_file,
    resolve_target,
    target_dirs,
    targets_dir,
)

SHIPPED = sorted(targets_dir().glob("*.toml"))

EXPECTED_ALIASES = {
    "jetson": "jetson-orin", "orin": "jetson-orin", "agx-orin": "jetson-orin",
    "orin-nano": "jetson-orin-nano", "orin-nx": "jetson-orin-nx", "thor": "jetson-thor",
    "rtx": "rtx-ada", "rtx-3090": "rtx-ampere", "rtx-4090": "rtx-ada", "rtx-5090": "rtx-blackwell",
    "h100": "hopper",
}

# A valid Jetson-like target; tests change one thing at a time.
BASE = {
    "name": "test-board",
    "description": "a test board",
    "kind": "jetson",
    "aliases": ["tb"],
    "compute_capability": "8.7",
    "tensorrt": "10.3",
    "cuda": "12.6",
    "jetpack": "6.2",
    "memory_gb": 8.0,
    "memory_budget_gb": 5.0,
    "unified_memory": True,
    "precision": "fp16",
    "max_batch": 1,
    "max_context": 2048,
    "workspace_mb": 1024,
    "tactic_dram_mb": 512,
    "sparse_levels": ["2:4"],
    "default_levels": ["0.5", "2:4"],
    "build_on_device": True,
}
BASE_PROFILES = {
    "prefill": {"batch": [1, 1, 1], "seq": [1, 128, 2048], "past": [0, 0, 0]},
    "decode": {"batch": [1, 1, 1], "seq": [1, 1, 1], "past": [0, 512, 2047]},
    "continue": {"batch": [1, 1, 1], "seq": [1, 64, 512], "past": [1, 512, 1536]},
}


def toml_text(fields: dict, profiles: dict) -> str:
    """TOML for a flat dict plus [profiles.*] tables; JSON scalars and arrays are valid TOML values."""
    lines = [f"{k} = {json.dumps(v)}" for k, v in fields.items()]
    for pname, axes in profiles.items():
        lines.append(f"[profiles.{pname}]")
        lines += [f"{axis} = {json.dumps(v)}" for axis, v in axes.items()]
    return "\n".join(lines) + "\n"


def write_target(folder: Path, drop: tuple[str, ...] = (), profiles: dict | None = None, **changes) -> Path:
    """Write BASE with ``changes`` applied and ``drop`` keys removed to folder/test-board.toml."""
    fields = {**BASE, **changes}
    for key in drop:
        fields.pop(key)
    profiles = profiles or BASE_PROFILES
    path = folder / "test-board.toml"
    path.write_text(toml_text(fields, profiles))
    return path


def with_profile(pname: str, axis: str, value: list[int]) -> dict:
    return {**BASE_PROFILES, pname: {**BASE_PROFILES[pname], axis: value}}


# --- the shipped profiles -------------------------------------------------------------------


def test_all_expected_targets_ship():
    assert set(all_targets()) == {
        "jetson-orin-nano", "jetson-orin-nx", "jetson-orin", "jetson-thor",
        "rtx-ampere", "rtx-ada", "rtx-blackwell", "hopper",
    }
    assert list(all_targets()) == sorted(all_targets())
    assert len(SHIPPED) == 8


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_target_is_valid(path, tmp_path):
    """What the shipped profiles promise beyond the schema (load_target_file refuses a profile that
    breaks the schema; these are choices a valid file could still get wrong)."""
    t = load_target_file(path)
    if t.kind == "jetson":
        assert t.tactic_dram_mb  # the tactic DRAM cap keeps the build inside unified memory
        assert not t.tensorrt.startswith(">=")  # Jetson TensorRT is whatever the JetPack ships
    assert t.precision == "fp16" and t.sparse_levels == ("2:4",)
    # every default level lies in optimize's default range (one artifact serves every target) and
    # every N:M default runs on the sparse tensor cores
    trained = parse_levels(DEFAULT_LEVELS)
    assert t.levels and all(lv in trained for lv in t.levels) and t.levels == sorted(t.levels, key=trained.index)
    assert all(lv in t.sparse for lv in t.levels if lv.is_nm)
    # a second chat turn fits: several new tokens on a cache of half the context and more
    cont = t.profiles["continue"]
    assert cont.seq[2] >= 512 and cont.past[2] >= t.max_context // 2 and cont.batch[2] == t.max_batch
    # to_dict is JSON for manifests and a complete target file: it loads back to the same target.
    d = json.loads(json.dumps(t.to_dict()))
    assert set(d) <= set(FIELDS) and "path" not in d
    copy = tmp_path / path.name
    copy.write_text(toml_text(d, d.pop("profiles")))
    assert load_target_file(copy) == dataclasses.replace(t, path=copy.resolve())


def test_bigger_devices_get_bigger_limits():
    ts = all_targets()
    assert ts["jetson-orin-nano"].max_context == 2048 and ts["jetson-orin-nano"].max_batch == 1
    budgets = [ts[n].memory_budget_gb for n in ("jetson-orin-nano", "jetson-orin-nx", "jetson-orin", "jetson-thor")]
    assert budgets == sorted(budgets) and len(set(budgets)) == 4
    assert ts["jetson-thor"].max_context == 8192 and ts["jetson-thor"].compute_capability == "11.0"
    assert ts["hopper"].max_batch == 16 and ts["hopper"].memory_budget_gb == 72.0


def test_every_alias_resolves():
    for alias, name in EXPECTED_ALIASES.items():
        assert resolve_target(alias).name == name
    declared = {a: t.name for t in all_targets().values() for a in t.aliases}
    assert declared == EXPECTED_ALIASES


# --- resolve_target -------------------------------------------------------------------------


def test_resolve_by_name_alias_and_path(tmp_path):
    assert resolve_target("jetson-orin-nano").name == "jetson-orin-nano"
    assert resolve_target("H100").name == "hopper"  # case does not matter on a command line
    assert resolve_target(str(targets_dir() / "rtx-ada.toml")).name == "rtx-ada"
    own = write_target(tmp_path)
    assert resolve_target(str(own)).name == "test-board"


def test_unknown_target_lists_known_names_and_aliases():
    with pytest.raises(UserError) as e:
        resolve_target("foo")
    msg = str(e.value)
    assert msg.startswith("unknown target 'foo': known targets are hopper, jetson-orin, jetson-orin-nano,")
    assert "(aliases: agx-orin -> jetson-orin," in msg and "h100 -> hopper" in msg and "\n" not in msg


def test_missing_target_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        resolve_target(str(tmp_path / "nope.toml"))


# --- tensorrt_matches -----------------------------------------------------------------------


def test_tensorrt_matches_exact_and_minimum():
    orin = resolve_target("jetson-orin")  # "10.3"
    assert orin.tensorrt_matches("10.3.0.30")
    assert orin.tensorrt_matches("10.3")
    assert not orin.tensorrt_matches("10.4")
    assert not orin.tensorrt_matches("10.13.0")  # 13 != 3 numerically, not a prefix match
    hopper = resolve_target("hopper")  # ">=10.0"
    assert hopper.tensorrt_matches("10.13")
    assert hopper.tensorrt_matches("10.0.1.6")
    assert not hopper.tensorrt_matches("9.2")
    with pytest.raises(UserError, match="unrecognized TensorRT version"):
        hopper.tensorrt_matches("unknown")


# --- errors in target files -----------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field, fragment",
    [
        (dict(drop=("cuda",)), "'cuda'", "missing field 'cuda'"),
        (dict(drop=("jetpack",)), "'jetpack'", "missing field 'jetpack'"),
        (dict(xyz=1), "'xyz'", "unknown field 'xyz'"),
        (dict(max_batch="one"), "'max_batch'", "field 'max_batch' must be an integer >= 1 (got \"one\")"),
        (dict(max_batch=True), "'max_batch'", "must be an integer >= 1 (got true)"),
        (dict(name="other-board"), "'name'", "must equal the file name stem"),
        (dict(kind="laptop"), "'kind'", "must be one of"),
        (dict(compute_capability="sm_87"), "'compute_capability'", "major.minor"),
        (dict(tensorrt="~10"), "'tensorrt'", ">=10.0"),
        (dict(memory_budget_gb=9.0), "'memory_budget_gb'", "must be <= memory_gb"),
        (dict(unified_memory=False), "'unified_memory'", "must be true"),
        (dict(build_on_device=False), "'build_on_device'", "must be true"),
        (dict(sparse_levels=["0.5"]), "'sparse_levels'", "N:M"),
        (dict(sparse_levels=["2:4"], compute_capability="7.5"), "'sparse_levels'", "must be empty"),
        (dict(default_levels=["0.95"]), "'default_levels'", "bad level"),
        (dict(default_levels=[]), "'default_levels'", "at least one"),
        (dict(aliases=["tb", "tb"]), "'aliases'", "twice"),
        (dict(kind="desktop", unified_memory=False, build_on_device=False), "'jetpack'", "only allowed when kind"),
        (dict(profiles=with_profile("decode", "past", [1, 512, 2047])), "'profiles.decode.past'",
         "field 'profiles.decode.past' must have min 0 (got [1, 512, 2047])"),
        (dict(profiles=with_profile("prefill", "seq", [1, 4096, 2048])), "'profiles.prefill.seq'", "min <= opt <= max"),
        (dict(profiles=with_profile("prefill", "seq", [1, 128])), "'profiles.prefill.seq'", "three integers"),
        (dict(profiles=with_profile("prefill", "batch", [0, 1, 1])), "'profiles.prefill.batch'", "min >= 1"),
        (dict(profiles=with_profile("decode", "batch", [1, 1, 2])), "'profiles.decode.batch'", "max_batch (1)"),
        (dict(profiles=with_profile("prefill", "past", [0, 0, 1])), "'profiles.prefill'", "must fit max_context 2048"),
        (dict(profiles=with_profile("decode", "seq", [1, 1, 2])), "'profiles.decode.seq'", "must be [1, 1, 1]"),
        (dict(profiles={**BASE_PROFILES, "decode": {**BASE_PROFILES["decode"], "beam": [1, 1, 1]}}),
         "'profiles.decode.beam'", "unknown field"),
        (dict(profiles={"prefill": BASE_PROFILES["prefill"]}), "'profiles.decode'", "missing field"),
        (dict(profiles={k: v for k, v in BASE_PROFILES.items() if k != "continue"}), "'profiles.continue'",
         "missing field"),
        (dict(profiles=with_profile("continue", "past", [0, 512, 1536])), "'profiles.continue.past'",
         "must have min >= 1 (an empty cache is prefill's)"),
        (dict(profiles=with_profile("continue", "seq", [1, 1, 1])), "'profiles.continue.seq'",
         "must have max >= 2 (one new token on a cache is decode's)"),
        (dict(profiles=with_profile("continue", "past", [1, 512, 2000])), "'profiles.continue'",
         "must fit max_context 2048: seq max 512 + past max 2000 = 2512"),
        (dict(profiles=with_profile("continue", "batch", [1, 1, 2])), "'profiles.continue.batch'", "max_batch (1)"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_target_file_names_file_and_field(tmp_path, kwargs, field, fragment):
    path = write_target(tmp_path, **kwargs)
    with pytest.raises(UserError) as e:
        load_target_file(path)
    msg = str(e.value)
    assert path.name in msg and field in msg and fragment in msg, msg
    assert "\n" not in msg


def test_invalid_toml_is_one_line_with_the_parser_message(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('name = "broken"\nkind = \n')
    with pytest.raises(UserError) as e:
        load_target_file(path)
    msg = str(e.value)
    assert "broken.toml" in msg and "invalid TOML" in msg and "line 2" in msg and "\n" not in msg


def test_shipped_file_errors_are_shown_relative_to_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "targets").mkdir()
    path = write_target(tmp_path / "targets", drop=("cuda",))
    with pytest.raises(UserError, match=r"^targets/test-board\.toml: missing field 'cuda'"):
        load_target_file(path.resolve())


# --- EPTS_TARGETS_DIR -----------------------------------------------------------------------


def test_env_dir_adds_and_replaces_targets(tmp_path, monkeypatch):
    hopper = (targets_dir() / "hopper.toml").read_text().replace("memory_budget_gb = 72.0", "memory_budget_gb = 60.0")
    (tmp_path / "hopper.toml").write_text(hopper)
    write_target(tmp_path)
    monkeypatch.setenv(ENV_DIR, str(tmp_path))
    assert target_dirs()[-1] == tmp_path
    ts = all_targets()
    assert "test-board" in ts and "jetson-orin" in ts
    assert ts["hopper"].memory_budget_gb == 60.0 and ts["hopper"].path == (tmp_path / "hopper.toml").resolve()
    assert resolve_target("h100").path.parent == tmp_path.resolve()
    assert resolve_target("tb").name == "test-board"


def test_env_dir_alias_clash_is_an_error(tmp_path, monkeypatch):
    write_target(tmp_path, aliases=["h100"])
    monkeypatch.setenv(ENV_DIR, str(tmp_path))
    with pytest.raises(UserError, match=r"alias 'h100' is declared by both .*hopper\.toml and .*test-board\.toml"):
        all_targets()


def test_env_dir_alias_equal_to_a_name_is_an_error(tmp_path, monkeypatch):
    write_target(tmp_path, aliases=["hopper"])
    monkeypatch.setenv(ENV_DIR, str(tmp_path))
    with pytest.raises(UserError, match=r"test-board\.toml: alias 'hopper' is the name of target 'hopper'"):
        all_targets()


def test_env_dir_must_exist(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "missing"))
    with pytest.raises(UserError, match=ENV_DIR):
        all_targets()


# --- capping the profiles at a model's context ----------------------------------------------


def test_cap_profile_by_hand():
    from epts_export.device.interface import cap_profile

    orin = resolve_target("jetson")  # max_context 4096
    prefill, decode, cont = orin.profiles.values()
    assert cap_profile(prefill, 4096) is prefill  # fits: unchanged
    assert cap_profile(prefill, 2048) == ShapeRange("prefill", prefill.batch, (1, 512, 2048), (0, 0, 0))
    assert cap_profile(decode, 2048) == ShapeRange("decode", decode.batch, (1, 1, 1), (0, 1024, 2047))
    # seq and past keep the target's proportion (1024 : 3072), opts stay inside the new maxima
    assert cap_profile(cont, 2048) == ShapeRange("continue", cont.batch, (1, 64, 512), (1, 1024, 1536))
    assert cap_profile(cont, 256) == ShapeRange("continue", cont.batch, (1, 64, 64), (1, 192, 192))
    with pytest.raises(UserError, match="needs at least 2 tokens"):
        cap_profile(cont, 1)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
@pytest.mark.parametrize("model_context", [128, 2048, 4096])
def test_capped_profiles_stay_valid(path, model_context):
    """Every shipped profile, cut to a model's context, is still a profile the target would accept."""
    from epts_export.device.interface import cap_profile

    t = load_target_file(path)
    for name, prof in t.profiles.items():
        capped = cap_profile(prof, min(model_context, t.max_context))
        assert capped.seq[2] + capped.past[2] <= min(model_context, t.max_context)
        assert capped.batch == prof.batch and capped.seq[0] == prof.seq[0] and capped.past[0] == prof.past[0]
        for triple in (capped.seq, capped.past):
            assert triple[0] <= triple[1] <= triple[2]
        if name == "decode":
            assert capped.seq == (1, 1, 1) and capped.past[2] == min(model_context, t.max_context) - 1
        if name == "prefill":
            assert capped.seq[2] == min(model_context, t.max_context, prof.seq[2])
