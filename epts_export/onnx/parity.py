"""`validate`: ONNX Runtime against the PyTorch model materialized at the same level.

For every level of an export (baked folders or the dynamic graph) the checks are:

    integrity  every file matches its sha256 in the manifest
    sparsity   (baked) each prunable initializer feeds MatMul directly and has exactly the
               zeros of the materialized weight, N:M along axis 0
    prefill    batch 2 x 11 tokens, empty past, one row left-padded by 3
    decode     batch 3 x 1 token after a 9-token past computed by the reference
    generate   32 greedy tokens from a fixed prompt, with the KV cache
    switched/prefill, switched/decode, switched/generate
               (dynamic) the same three checks on weights.onnx + decoder.onnx (``ElasticDecoder``),
               one session that has just switched to the level from another one
    switch     (dynamic) that switched session generates the same tokens, with the same prefill
               logits, as a session opened at the level
    out_of_range  (dynamic) sparsity_level = -1 and = len(levels) give all-NaN outputs from
               model.onnx and all-NaN weights from weights.onnx

Shapes differ from the export's dummy shapes on purpose. Element-wise outputs pass when
|onnx - ref| <= atol + rtol * |ref| (numpy.allclose); the report also gives the smallest atol
that would have passed at that rtol, as Polygraphy does. Positions of padding tokens are not
compared (their outputs are undefined). A top-1 disagreement fails only where the reference's
own margin between the two tokens exceeds the logits atol (else it is a tie the dtype cannot
resolve). fp32 graphs must generate exactly the reference's tokens; fp16 graphs are compared
against the float32 reference and may diverge only at such a near-tie.
"""

from __future__ import annotations

import contextlib
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable

import numpy as np

from ..core.levels import Level
from ..errors import UserError, one_line
from ..fsutil import atomic_path, write_json
from ..device.interface import LEVEL_INPUT, WEIGHTS_GRAPH
from ..progress import Progress
from . import graph as onnx_graph
from .reader import OnnxExport
from ..device.compare import TOLERANCES, step_check
from ..device.ort import ElasticDecoder, OrtDecoder, greedy, positions
from .reference import TorchDecoder

PROMPT = "Once upon a time, in a quiet town by the sea,"
NEW_TOKENS = 32


def _cases(vocab: int, rng: np.random.Generator, prefill_batch: int = 2, decode_batch: int = 3):
    """(prefill ids, mask), (decode past ids, past mask, step ids). Shapes differ from export's
    dummy (2 x 4 on 3); the last row of each batch (when there are two or more) is left-padded."""
    hi = max(vocab - 1, 5)
    ids = rng.integers(4, hi, (prefill_batch, 11))
    mask = np.ones((prefill_batch, 11), np.int64)
    if prefill_batch > 1:
        mask[-1, :3] = 0
    past_ids = rng.integers(4, hi, (decode_batch, 9))
    past_mask = np.ones((decode_batch, 9), np.int64)
    if decode_batch > 1:
        past_mask[-1, :2] = 0
    step_ids = rng.integers(4, hi, (decode_batch, 1))
    return (ids, mask), (past_ids, past_mask, step_ids)


def compare(ref, got, dtype: str, vocab: int, prompt: list[int], output_names: list[str], max_batch: int = 3) -> dict:
    """The prefill, decode and generate checks of ``got`` (an ORT or TensorRT decoder) against
    ``ref`` (the float32 PyTorch reference): {check name: result with "passed"}."""
    tols = TOLERANCES[dtype]
    pb, db = min(2, max_batch), min(3, max_batch)
    (ids, mask), (pids, pmask, sids) = _cases(vocab, np.random.default_rng(0), pb, db)
    checks = {}
    pos = positions(mask, 0)
    c = step_check(ref.step(ids, mask, pos, ref.empty_past(pb)), got.step(ids, mask, pos, got.empty_past(pb)),
                    tols, mask.astype(bool), mask.astype(bool), output_names)
    checks["prefill"] = {"shape": {"batch": pb, "seq": 11, "past": 0}, **c}
    _, past = ref.step(pids, pmask, positions(pmask, 0), ref.empty_past(db))
    dmask = np.concatenate([pmask, np.ones((db, 1), np.int64)], axis=1)
    dpos = positions(dmask, 9)
    c = step_check(ref.step(sids, dmask, dpos, past), got.step(sids, dmask, dpos, past),
                    tols, np.ones((db, 1), bool), dmask.astype(bool), output_names)
    checks["decode"] = {"shape": {"batch": db, "seq": 1, "past": 9}, **c}
    checks["generate"] = _generation(ref, got, prompt, dtype, tols["logits"].atol)
    return checks


def _generation(ref: TorchDecoder, got: OrtDecoder, prompt: list[int], dtype: str, atol: float) -> dict:
    ref_logits: list[np.ndarray] = []
    got_logits: list[np.ndarray] = []

    def tap(step, sink):
        def run(*a):
            logits, past = step(*a)
            sink.append(logits[0, -1])
            return logits, past
        return run

    r = greedy(tap(ref.step, ref_logits), ref.empty_past(1), prompt, NEW_TOKENS)
    g = greedy(tap(got.step, got_logits), got.empty_past(1), prompt, NEW_TOKENS)
    first = next((i for i, (a, b) in enumerate(zip(r, g)) if a != b), None)
    match = first is None
    if match:
        passed, why = True, None
    elif dtype == "fp32":
        passed, why = False, f"token {first} differs ({g[first]} vs reference {r[first]})"
    else:  # fp16 may only diverge at a near-tie of the reference
        lg = ref_logits[first]
        margin = float(lg[r[first]] - lg[g[first]])
        passed = margin <= atol
        why = None if passed else f"token {first} differs ({g[first]} vs {r[first]}) where the reference prefers its token by {margin:.3f} > {atol}"
    return {"passed": passed, "prompt_tokens": len(prompt), "new_tokens": NEW_TOKENS, "reference": r, "onnx": g,
            "match": match, "first_divergence": first, **({"reason": why} if why else {})}


def _expected_zeros(model, weights: dict[str, str], dtype: str) -> dict[str, np.ndarray]:
    """Zeros of the materialized weights in the export's dtype (a kept weight below float16's
    smallest subnormal is a zero of the fp16 weight too)."""
    import torch

    cast = torch.float16 if dtype == "fp16" else torch.float32
    out = {}
    for name, module in weights.items():
        w = model.get_submodule(module).weight.detach().to(cast)
        out[name] = (w == 0).t().numpy()
    return out


def _block_levels(em, weights: dict[str, str], lv: Level) -> dict[str, Level] | None:
    """Initializer name -> the level its block prunes to under the artifact's layer-wise allocation
    (None when every block prunes to ``lv``)."""
    alloc = em.artifact.allocation
    if alloc.uniform or lv.is_nm:
        return None
    prefix = em.family.blocks + "."
    return {name: Level(sparsity=alloc.sparsity(int(module[len(prefix):].split(".")[0]), lv.sparsity))
            for name, module in weights.items()}


def prompt_ids(tokenizer) -> list[int]:
    """The fixed prompt of the generate check, tokenized."""
    return tokenizer(PROMPT)["input_ids"] or [tokenizer.bos_token_id or 0]


def check_levels(em, levels: list[Level], open_decoder: Callable[[Level], tuple[object, dict]], dtype: str,
                 output_names: list[str], *, label: str, progress: Progress, max_batch: int = 3,
                 before: Callable[[Level], dict] | None = None, after: Callable[[Level, object], dict] | None = None,
                 prefix: str = "", reference: Callable[[Level, object], contextlib.AbstractContextManager] | None = None,
                 ) -> tuple[list[dict], list[str]]:
    """The one validation loop: every level of a decoder (ONNX Runtime, TensorRT, ...) against
    the float32 PyTorch model materialized at that level (``em.at``).

    ``open_decoder(level)`` returns (decoder with ``step``/``empty_past``, fields for the report
    entry); a UserError there is a failed "load" check. ``before(level)`` adds checks that need
    no decoder (integrity), ``after(level, model)`` checks that need a loaded one (sparsity).
    ``reference(level, model)``: a context in which ``model`` is the reference instead (int8: the
    fake-quantized model, ``quant.fake``); the entry then also gives the decoder's distance from
    the float model on the prompt ("distance_from_float", informative: what quantization costs).
    Returns (one report entry per level, failure lines "level L / <prefix><check>: why").
    """
    prompt = prompt_ids(em.tokenizer)
    entries, failures = [], []
    with progress.count(label, len(levels)) as advance:
        for lv in levels:
            entry = {"level": lv.name, "checks": dict(before(lv)) if before else {}}
            model = em.at(lv)
            try:
                got, info = open_decoder(lv)
                entry.update(info)
            except UserError as e:
                entry["checks"]["load"] = {"passed": False, "error": str(e)}
                got = None
            float_logits = _prompt_logits(TorchDecoder(model), prompt) if reference and got is not None else None
            with contextlib.ExitStack() as stack:
                if reference and got is not None:
                    try:
                        stack.enter_context(reference(lv, model))
                    except UserError as e:  # a missing or malformed recipe: this level cannot be checked
                        entry["checks"]["reference"] = {"passed": False, "error": str(e)}
                        got = None
                if got is not None:
                    if after:
                        entry["checks"].update(after(lv, model))
                    entry["checks"].update(compare(TorchDecoder(model), got, dtype, model.config.vocab_size, prompt,
                                                   output_names, max_batch))
                    if float_logits is not None:
                        entry["distance_from_float"] = _distance(_prompt_logits(got, prompt), float_logits)
            entry["passed"] = all(c.get("passed") for c in entry["checks"].values())
            failures += [f"level {lv.name} / {prefix}{name}: {why(c)}" for name, c in entry["checks"].items()
                         if not c.get("passed")]
            entries.append(entry)
            advance()
    return entries, failures


def _prompt_logits(decoder, prompt: list[int]) -> np.ndarray:
    """(T, V) logits of the prompt's prefill, batch 1."""
    ids = np.array([prompt], np.int64)
    mask = np.ones_like(ids)
    logits, _ = decoder.step(ids, mask, positions(mask, 0), decoder.empty_past(1))
    return logits[0]


def _distance(got: np.ndarray, ref: np.ndarray) -> dict:
    d = np.abs(got.astype(np.float64) - ref)
    return {"max_abs": round(float(d.max()), 4), "mean_abs": round(float(d.mean()), 4),
            "top1_agreement": round(float((got.argmax(-1) == ref.argmax(-1)).mean()), 4), "positions": int(len(ref))}


def validate(export_dir: "str | Path | OnnxExport", levels: list[Level] | None = None, artifact=None,
             progress: Progress | None = None, threads: int | None = None, model=None) -> dict:
    """Check every level (or ``levels``) of an export; returns the report (module docstring).
    UserError only for bad input (not an export, missing source artifact); a failed check is
    recorded in the report, never raised.

    ``export_dir``: the folder, or the opened OnnxExport (its files hashed when it was opened or
    written). ``artifact``: the source artifact's folder or the opened Artifact (default: where the
    export says). ``model``: that artifact's ElasticModel when the caller has it loaded."""
    from ..artifact.materialize import ElasticModel

    progress = progress or Progress(enabled=False)
    t0 = time.time()
    exp = export_dir if isinstance(export_dir, OnnxExport) and export_dir.verified else \
        OnnxExport.open(getattr(export_dir, "path", export_dir), verify="collect")
    have = exp.levels
    if levels:
        unknown = [lv.name for lv in levels if lv not in have]
        if unknown:
            raise UserError(f"level {', '.join(unknown)} is not in export {exp.path} (it has {', '.join(lv.name for lv in have)})")
    todo = levels or have
    art = exp.source_artifact(artifact)
    tols = TOLERANCES[exp.dtype]
    weights = exp.manifest["weights"]
    if model is not None and model.artifact.manifest_sha256 == art.manifest_sha256:
        em = model
    else:
        with progress.status(f"loading the reference model from {art.path}"):
            em = ElasticModel(art)

    def integrity(lv: Level) -> dict:
        folder = exp.graph_path(lv).relative_to(exp.path).parent.as_posix()  # "level-0.5", or "." for the dynamic graph
        bad = [str(e) for e in exp.integrity_errors if e.under("" if folder == "." else folder)]
        return {"integrity": {"passed": not bad, "errors": bad}}

    def open_graph(lv: Level):
        graph_path = exp.graph_path(lv)
        info = {"graph": graph_path.relative_to(exp.path).as_posix()}
        return OrtDecoder(graph_path, level=exp.level_index(lv), threads=threads), info

    switcher: list = []  # the one ElasticDecoder that switches through every level (dynamic mode)

    def after(lv: Level, model) -> dict:
        if exp.mode == "dynamic":
            return _switch_checks(exp, lv, model, em, switcher, threads)
        try:
            graph = onnx_graph.load(exp.graph_path(lv))
            res = onnx_graph.check_sparsity(graph, weights, lv, _expected_zeros(model, weights, exp.dtype),
                                            _block_levels(em, weights, lv))
            checks = {"sparsity": {"passed": res.pop("ok"), **res}}
            if exp.dtype == "int8":
                from ..quant.qdq import check_quantized

                checks["int8"] = check_quantized(graph, weights, {m: model.get_submodule(m) for m in weights.values()})
            return checks
        except UserError as e:
            return {"sparsity": {"passed": False, "failures": [str(e)]}}

    entries, level_failures = check_levels(em, todo, open_graph, exp.dtype, exp.manifest["io"]["outputs"],
                                           label="validating levels", progress=progress, before=integrity, after=after,
                                           reference=int8_reference(exp, em) if exp.dtype == "int8" else None)
    failures = [f"integrity: {e}" for e in exp.integrity_errors] + level_failures
    oor = _out_of_range(exp, threads) if exp.mode == "dynamic" else None
    if oor and not oor["passed"]:
        failures.append(f"out_of_range: {why(oor)}")
    report = {"export": str(exp.path), "mode": exp.mode, "dtype": exp.dtype,
              "source_artifact": str(art.path), "passed": not failures,
              "tolerances": {k: v.to_dict() for k, v in tols.items()},
              "integrity": {"passed": not exp.integrity_errors, "errors": [str(e) for e in exp.integrity_errors]},
              "levels": entries, **({"out_of_range": oor} if oor else {}),
              "failures": failures, "elapsed_s": round(time.time() - t0, 2)}
    exp.record_parity({"passed": report["passed"], "failures": failures, "levels": [e["level"] for e in entries],
                       "validated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    from .export import write_export_report

    write_export_report(exp.path, exp.manifest, report)
    return report


def int8_reference(exp: OnnxExport, em):
    """reference(level, model) for ``check_levels``: the level's recipe (its folder's quant.json)
    folded into ``model`` and its linears fake-quantized; the level re-materialized afterwards."""
    from ..quant.fake import fake_quantized
    from ..quant.recipe import Int8Recipe

    def reference(lv: Level, model):
        recipe = Int8Recipe.load(exp.graph_path(lv).parent)
        return fake_quantized(model, em.family, recipe, restore_prunable=lambda: em.at(lv))

    return reference


SWITCH_ATOL = 1e-5  # the same weights in the same kernels: a switched session computes what a fresh one does


def _switch_checks(exp: OnnxExport, lv: Level, model, em, switcher: list, threads: int | None) -> dict:
    """The level served by ``ElasticDecoder`` right after a switch from another level: the
    prefill/decode/generate checks against PyTorch, and the same tokens and prefill logits as a
    session opened at the level. The first call opens the switching session at the last level."""
    if not exp.has_parts:
        return {}
    idx = exp.level_index(lv)
    try:
        if not switcher:
            switcher.append(ElasticDecoder(exp.path, level=len(exp.levels) - 1, threads=threads))
        sw = switcher[0]
        seconds = sw.set_level(idx)
        fresh = ElasticDecoder(exp.path, level=idx, threads=threads)
    except UserError as e:
        return {"switch": {"passed": False, "error": str(e)}}
    prompt = prompt_ids(em.tokenizer)
    checks = {f"switched/{k}": v for k, v in compare(TorchDecoder(model), sw, exp.dtype, model.config.vocab_size, prompt,
                                                      exp.manifest["io"]["outputs"]).items()}
    ids = np.array([prompt], np.int64)
    mask = np.ones_like(ids)
    diff = float(np.abs(sw.step(ids, mask, positions(mask, 0), sw.empty_past(1))[0]
                        - fresh.step(ids, mask, positions(mask, 0), fresh.empty_past(1))[0]).max())
    tokens = greedy(fresh.step, fresh.empty_past(1), prompt, NEW_TOKENS)
    switched = checks["switched/generate"]["onnx"]
    passed = tokens == switched and diff <= SWITCH_ATOL
    reason = None if passed else (f"after a switch the prefill logits differ from a fresh session's by {diff:.3g} > {SWITCH_ATOL:g}"
                                  if tokens == switched else "after a switch the tokens differ from a fresh session's")
    checks["switch"] = {"passed": passed, "switch_s": round(seconds, 4), "max_abs": diff, "fresh": tokens,
                        "switched": switched, **({"reason": reason} if reason else {})}
    checks["switched/sparsity"] = _built_sparsity(sw.level_weights(), _expected_zeros(model, exp.manifest["weights"], exp.dtype))
    return checks


def _built_sparsity(built: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> dict:
    """The weights a switch built against the materialized model's zeros: every pruned weight is an
    exact zero (the mask, N:M along the rows of W_t), and barely any other is (a kept weight may
    round to zero). ``measured`` is the fraction of zeros over the prunable weights."""
    zeros = total = extra = 0
    wrong = []
    for name, want in expected.items():
        got = built[name] == 0
        if (want & ~got).any():
            wrong.append(name)
        zeros += int(got.sum())
        total += got.size
        extra += int((got & ~want).sum())
    passed = not wrong and extra <= 1e-4 * total
    out = {"passed": passed, "measured": round(zeros / max(total, 1), 6), "extra_zeros": extra}
    if not passed:
        out["reason"] = (f"pruned weights are not zero in {', '.join(wrong[:3])}" if wrong
                         else f"{extra} kept weights are zero")
    return out


def _out_of_range(exp: OnnxExport, threads: int | None) -> dict:
    """The defined behaviour for a bad sparsity_level: every output is NaN (model.onnx), every
    built weight is NaN (weights.onnx)."""
    import onnxruntime as ort

    n = len(exp.levels)
    results = {}
    for bad in (-1, n):
        try:
            sess = OrtDecoder(exp.path / "model.onnx", level=bad, threads=threads, allow_out_of_range=True)
            ids = np.array([[5, 6, 7]], np.int64)
            mask = np.ones_like(ids)
            logits, presents = sess.step(ids, mask, positions(mask, 0), sess.empty_past(1))
            results[str(bad)] = bool(np.isnan(logits).all() and all(np.isnan(p).all() for p in presents))
            if exp.has_parts:
                builder = ort.InferenceSession(str(exp.path / WEIGHTS_GRAPH), providers=["CPUExecutionProvider"])
                built = builder.run(None, {LEVEL_INPUT: np.array(bad, np.int64)})
                results[f"{WEIGHTS_GRAPH} {bad}"] = bool(all(np.isnan(w).all() for w in built))
        except Exception as e:  # noqa: BLE001 - any failure to produce the NaN contract is a failed check
            results[str(bad)] = False
            results[f"{bad}_error"] = one_line(e, 200)
    ok = all(v for k, v in results.items() if not k.endswith("_error"))
    return {"passed": ok, "levels_tried": [-1, n], "all_nan": results,
            **({} if ok else {"reason": "an out-of-range sparsity_level did not give all-NaN outputs"})}


def why(check: dict) -> str:
    """One line saying why a check failed."""
    if "error" in check:
        return check["error"]
    if "errors" in check and check["errors"]:
        return "; ".join(check["errors"][:3])
    if "failures" in check and check["failures"]:
        more = f" (+{len(check['failures']) - 3} more)" if len(check["failures"]) > 3 else ""
        return "; ".join(check["failures"][:3]) + more
    if "reason" in check:
        return check["reason"]
    if "outputs" in check:
        bad = [(n, o) for n, o in check["outputs"].items() if not o["passed"]]
        parts = [f"{n}: {o['error']}" if "error" in o else
                 f"{n} max abs err {o['max_abs']:.3g} needs atol {o['required_atol']:.3g} > {o['atol']:g} (rtol {o['rtol']:g})"
                 if o["required_atol"] > o["atol"] else
                 f"{n} mean abs err {o['mean_abs']:.3g} > {o['mean_atol']:g}" for n, o in bad[:3]]
        if len(bad) > 3:
            parts.append(f"+{len(bad) - 3} more outputs")
        if check.get("top1_failures"):
            parts.append(f"{check['top1_failures']} top-1 disagreements beyond a tie")
        return "; ".join(parts)
    return "failed"


def write_junit(report: dict, path: Path) -> None:
    """One <testcase> per level and check, a <failure> with the reason for each failed one."""
    suite = ET.Element("testsuite", name=f"epts-export validate {report['export']}")
    cases = []
    for entry in report["levels"]:
        for name, c in entry["checks"].items():
            cases.append((f"level-{entry['level']}", name, c))
    if "out_of_range" in report:
        cases.append(("graph", "out_of_range", report["out_of_range"]))
    fails = 0
    for cls, name, c in cases:
        tc = ET.SubElement(suite, "testcase", classname=cls, name=name)
        if not c.get("passed"):
            fails += 1
            ET.SubElement(tc, "failure", message=why(c)[:500]).text = why(c)
    suite.set("tests", str(len(cases)))
    suite.set("failures", str(fails))
    suite.set("errors", "0")
    suite.set("time", str(report["elapsed_s"]))
    root = ET.Element("testsuites")
    root.append(suite)
    with atomic_path(path) as tmp:
        ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)


def write_report(report: dict, path: Path) -> None:
    write_json(path, report)
