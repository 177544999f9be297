"""Describe a bundle and check its integrity: what ``rrise inspect BUNDLE [--json] [--verify]
[--trust KEY.pub]`` prints: manifest, id, signature, guarantee, integrity and, with ``--verify``,
each variant's quantile recomputed.

No torch, no scipy (``--verify`` runs onnxruntime), so it runs on the edge device next to the
bundle. A damaged bundle is still described: the manifest is read (and its values validated)
without the file check first, then every file is checked.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

from .bundle import ADAPTIVE_GUARANTEE, Bundle, BundleError
from .manifest_schema import CONTROL_CHARACTERS
from .recalibration import verify_counts, verify_quantiles
from .sequential import DEFAULT_MC_ALPHA
from .signing import SigningError, read_signature, verify_signature

__all__ = ["adaptive_guarantee_text", "format_inspection", "guarantee_text", "inspect_bundle"]

_WIDTH = 100


def guarantee_text(guarantee: str, alpha: float | None, beta: float | None) -> str:
    """The bundle's guarantee with its own α and β filled in: "... at least 1 − α − β = 0.989 ..."."""
    if alpha is None or beta is None:
        return guarantee
    level = f"1 − α − β = {1.0 - float(alpha) - float(beta):.6g} (α = {float(alpha):g}, β = {float(beta):g})"
    for phrase in ("1 - alpha - beta", "1 − α − β"):
        if phrase in guarantee:
            return guarantee.replace(phrase, level, 1)
    return f"{guarantee} Here {level}."


def adaptive_guarantee_text(
    alpha: float | None,
    beta: float | None,
    mc_alpha: float = DEFAULT_MC_ALPHA,
    text: str = ADAPTIVE_GUARANTEE,
) -> str:
    """Adaptive certification's composed guarantee (:data:`rrise.bundle.ADAPTIVE_GUARANTEE`) with
    the bundle's α and β and the Monte Carlo level A (``--mc-alpha``) filled in:
    "... at least 1 − α − β − A = 0.948 (α = 0.05, β = 0.001, A = 0.001) ..."."""
    if alpha is None or beta is None:
        return text
    a, b, m = float(alpha), float(beta), float(mc_alpha)
    level = f"1 − α − β − A = {1.0 - a - b - m:.6g} (α = {a:g}, β = {b:g}, A = {m:g})"
    return text.replace("1 - alpha - beta - A", level, 1)


def inspect_bundle(
    path: str | os.PathLike, *, trust: str | os.PathLike | None = None, verify: bool = False
) -> tuple[dict[str, Any], list[str]]:
    """``(summary, problems)`` for the bundle at ``path``.

    ``summary`` is JSON-serializable: id, path, created, rrise_version, schema_version, model (file,
    input, output), num_classes, labels, sigma, preprocess, calibration, variants (with their
    quantiles), base_model (its file), guarantee (as written and with α, β filled in), adaptive
    (the bundle's routing rule for ``rrise run --mc-budget N``, or None), guarantee_adaptive (the
    guarantee of a run with Monte Carlo draws, at the default ``--mc-alpha``), export,
    made_with (the pipeline profile and its note; None when not recorded), files,
    signature (``signed``, the signer's ``key``, ``trusted``: True/False, or None when no ``trust``
    key was given) and, with ``verify``, ``verification`` (one result per variant, see
    :func:`rrise.recalibration.verify_quantiles`) and ``count_verification`` (the record against
    ``calibration.npz`` and the Monte Carlo spot-check of σ and the counts, see
    :func:`rrise.recalibration.verify_counts`).
    ``problems`` is empty exactly when :meth:`Bundle.load` (with ``trust``) would accept the bundle
    and every verifiable quantile was reproduced; otherwise it lists each changed, missing or extra
    file (by name), the manifest error, the signature failure or the quantile mismatch.
    """
    path = Path(path)
    try:
        bundle = Bundle.load(path, verify=False)
    except BundleError as exc:
        return {"path": str(path), "id": None}, [str(exc)]
    problems = bundle.integrity_problems()
    m = bundle.manifest
    cal = dict(m["calibration"])
    summary: dict[str, Any] = {
        "id": bundle.id,
        "path": str(path),
        "created": m["created"],
        "rrise_version": m["rrise_version"],
        "schema_version": m["schema_version"],
        "model": {k: m["model"].get(k) for k in ("file", "input", "output")},
        "num_classes": m["model"]["num_classes"],
        "labels": m["model"].get("labels") or [],
        "sigma": m["smoothing"]["sigma"],
        "preprocess": m["preprocess"],
        "calibration": cal,
        "variants": [_variant_summary(bundle, variant) for variant in m["variants"]],
        "base_model": m["base_model"].get("file"),
        "guarantee": m["guarantee"],
        "guarantee_filled": adaptive_guarantee_text(
            cal.get("alpha"),
            cal.get("beta"),
            text=guarantee_text(str(m["guarantee"]), cal.get("alpha"), cal.get("beta")),
        ),
        "adaptive": m.get("adaptive"),
        "guarantee_adaptive": adaptive_guarantee_text(cal.get("alpha"), cal.get("beta")),
        "export": m.get("export"),
        "made_with": m.get("made_with"),
        "files": dict(m["files"]),
    }
    summary["signature"] = _signature(bundle, trust, problems)
    if verify:
        summary["verification"] = _verification(bundle, problems)
        summary["count_verification"] = _count_verification(bundle, problems)
    return summary, problems


def _signature(bundle: Bundle, trust: str | os.PathLike | None, problems: list[str]) -> dict[str, Any]:
    """What ``manifest.sig`` says and, given a ``trust`` key, whether it verifies (a failure, or a
    malformed signature, is added to ``problems`` only when a key was given)."""
    out: dict[str, Any] = {
        "signed": False,
        "key": None,
        "trusted": None,
        "trusted_key": None,
        "release": None,
        "expires": None,
    }
    try:
        info = read_signature(bundle.path)
    except SigningError as exc:
        info = None
        out["error"] = str(exc)
    if info is not None:  # release and expires as the signature states them (verified only with trust)
        out.update(signed=True, key=info.key, release=info.release, expires=info.expires)
    if trust is None:
        return out
    out["trusted"] = False
    try:
        out["trusted_key"] = verify_signature(bundle, trust)
        out["trusted"] = True
    except SigningError as exc:
        problems.append(str(exc))
    return out


def _verification(bundle: Bundle, problems: list[str]) -> list[dict[str, Any]]:
    """Each variant's quantile recomputed (:func:`rrise.recalibration.verify_quantiles`); a mismatch, or a
    bundle that cannot be verified at all, is added to ``problems``."""
    if problems:
        problems.append("quantiles not verified: the bundle failed the checks above")
        return []
    try:
        results = verify_quantiles(bundle)
    except (BundleError, ValueError, RuntimeError, ImportError) as exc:
        problems.append(f"quantiles could not be verified: {exc}")
        return []
    problems += [
        f"variant {r['variant']} ({r['file']}): its quantile does not match calibration.npz and its model: "
        f"{r['detail']}"
        for r in results
        if r["status"] == "mismatch"
    ]
    return results


def _count_verification(bundle: Bundle, problems: list[str]) -> dict[str, Any] | None:
    """The calibration record against ``calibration.npz`` and the stored counts against fresh draws
    of the base model at σ (:func:`rrise.recalibration.verify_counts`); each failure is added to
    ``problems`` by name."""
    if problems:
        return None
    try:
        result = verify_counts(bundle)
    except (BundleError, ValueError, RuntimeError, ImportError) as exc:
        problems.append(f"calibration counts could not be verified: {exc}")
        return None
    problems += [f"the calibration record does not match calibration.npz: {p}" for p in result["record"]]
    spot = result["spot_check"]
    if spot is not None and spot["status"] == "mismatch":
        problems.append(f"σ or the calibration counts do not match the base model: {spot['detail']}")
    return result


def _variant_summary(bundle: Bundle, variant: dict[str, Any]) -> dict[str, Any]:
    """A variant's manifest entry (less its hash) and ``max_radius``: the largest radius it can ever
    certify, σ·(Φ⁻¹(p_cap) − q̂) (None when it has no usable quantile)."""
    out = {k: v for k, v in variant.items() if k != "sha256"}
    try:
        out["max_radius"] = bundle.calibration(variant).max_radius()
    except BundleError:
        out["max_radius"] = None
    return out


def _num(x: Any) -> str:
    return f"{x:.6g}" if isinstance(x, float) else str(x)


def _wrap(text: str, indent: str = "  ") -> str:
    return textwrap.fill(text, width=_WIDTH, initial_indent=indent, subsequent_indent=indent)


_CALIBRATION_KEYS = (
    "score",
    "alpha",
    "beta",
    "delta",
    "m",
    "n_mc",
    "cap_draws",
    "quantile",
    "p_cap",
    "dataset",
    "bin_edges",
)


def _model_lines(summary: dict[str, Any]) -> list[str]:
    model, labels = summary["model"], summary["labels"]
    inp, out = model.get("input") or {}, model.get("output") or {}
    return [
        f"Created      {summary['created']} by rrise {summary['rrise_version']} "
        f"(schema {summary['schema_version']})",
        f"Model        {model.get('file')}: {inp.get('name')} {inp.get('shape')} {inp.get('dtype')} "
        f"in {inp.get('range')} -> {out.get('name')} (kind {out.get('kind')}), "
        f"{summary['num_classes']} classes",
        f"Labels       {', '.join(map(str, labels)) if labels else '(none: class indices)'}",
        "Preprocess   " + ", ".join(f"{k} {v}" for k, v in summary["preprocess"].items()),
        f"Smoothing    sigma = {_num(summary['sigma'])} ([0,1]-pixel units of the model input)",
    ]


def _calibration_lines(cal: dict[str, Any]) -> list[str]:
    lines = ["Calibration  " + ", ".join(f"{k} = {_num(cal[k])}" for k in _CALIBRATION_KEYS if k in cal)]
    if cal.get("score_map_x"):
        knots = ", ".join(f"{a:.4g}→{b:.4g}" for a, b in zip(cal["score_map_x"], cal["score_map_y"]))
        lines.append(f"Score map    learned on the selection split, {len(cal['score_map_x'])} knots: {knots}")
    if cal.get("score_scale_x"):
        knots = ", ".join(f"{a:.4g}→{b:.4g}" for a, b in zip(cal["score_scale_x"], cal["score_scale_y"]))
        count = len(cal["score_scale_x"])
        lines.append(f"Score scale  learned on the selection split, {count} knots: {knots}")
    if cal.get("clip_at_abstention"):
        lines.append("Scores       clipped at each calibration input's abstention threshold (same guarantee)")
    made_from = [f"{k} {cal[k][:16]}…" for k in ("base_sha256", "surrogate_sha256") if cal.get(k)]
    if made_from:
        lines.append("Made from    " + ", ".join(made_from))
    return lines


def _profile_lines(made_with: dict[str, Any] | None) -> list[str]:
    """The pipeline profile the bundle was made with (``made_with``), or "not recorded"."""
    if not made_with:
        return ["Profile      not recorded (made before profiles were recorded, or by rrise-export alone)"]
    lines = [f"Profile      {made_with['profile']}"]
    if made_with.get("profile_note"):
        lines.append(_wrap(made_with["profile_note"], "             "))
    return lines


def _variant_lines(v: dict[str, Any]) -> list[str]:
    extra = ", ".join(
        f"{k} {v[k]}" for k in ("calibrated_with", "max_batch", "trt_version", "compute_capability") if k in v
    )
    q = v.get("quantile")
    shown = f"quantile = {_num(q)}" if q is not None else "NO quantile (the runtime refuses it)"
    if v.get("bin_quantiles") is not None:
        shown += ", per confidence bin " + ", ".join(
            "inf (abstain)" if b is None else _num(b) for b in v["bin_quantiles"]
        )
    if v.get("max_radius") is not None:
        shown += f", largest radius {v['max_radius']:.4g}"
    lines = [
        f"  {v.get('precision')}/{v.get('backend')}  {v.get('file')}  {shown}"
        + (f"  ({extra})" if extra else "")
    ]
    if q is None:
        lines.append(_wrap(f"needs recalibration: {v.get('needs_recalibration')}", "    "))
    return lines


def _printable(value: Any) -> Any:
    """``value`` with every string in it (dict keys too) escaped where it holds a control character
    (:func:`rrise.manifest_schema.unsafe_value`'s set), as Python writes such characters."""
    if isinstance(value, str):
        return CONTROL_CHARACTERS.sub(lambda m: m[0].encode("unicode_escape").decode("ascii"), value)
    if isinstance(value, dict):
        return {_printable(k): _printable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_printable(v) for v in value]
    return value


def _signature_line(sig: dict[str, Any] | None) -> str:
    if sig is None:
        return "Signature    (not read)"
    if sig.get("error"):
        return f"Signature    unreadable: {sig['error']}"
    if not sig["signed"]:
        state = "none (unsigned: `rrise-export ... --sign KEY` signs a bundle)"
        return f"Signature    {state}" + (
            "; a trusted key was given: FAILED" if sig["trusted"] is False else ""
        )
    release = ""
    if sig.get("release") is not None or sig.get("expires") is not None:
        release = f", release {sig.get('release')}" + (
            f", expires {sig['expires']}" if sig.get("expires") else ""
        )
    if sig["trusted"] is None:
        return f"Signature    Ed25519 by key {sig['key']}{release} (not checked: pass --trust KEY.pub)"
    if sig["trusted"]:
        return f"Signature    OK: Ed25519 by the trusted key {sig['trusted_key']}{release}"
    return f"Signature    FAILED: not a valid signature by the trusted key (it names key {sig['key']})"


NOT_RECOMPUTED = (
    "Not recomputable from the bundle: the preprocess, what each label means, whether the calibration "
    "images are exchangeable with deployment inputs, and the base model's own fitness; only a signature "
    "(--trust) by someone who checked them protects these."
)


def _verification_lines(
    results: list[dict[str, Any]], counts: dict[str, Any] | None, bundle_id: str
) -> list[str]:
    lines = [
        "Verify       each variant's quantile and monitor reference recomputed from calibration.npz and "
        "its own model"
    ]
    for r in results:
        if r["status"] == "ok":
            state = f"OK (quantile {_num(r['recomputed'])} reproduced)"
        elif r["status"] == "mismatch":
            state = f"MISMATCH: {r['detail']}"
        elif r["status"] == "uncalibrated":
            state = "no quantile to verify (needs recalibration)"
        else:
            state = f"{r['status']}: {r['detail']}"
        lines.append(_wrap(f"{r['variant']}  {r['file']}  {state}", "  "))
    if counts is not None:
        record = "OK" if not counts["record"] else "MISMATCH: " + "; ".join(counts["record"])
        lines.append(
            _wrap(f"record  σ, N, m, cap draws, classes and input shape against calibration.npz: {record}")
        )
        spot = counts["spot_check"]
        if spot is not None:
            head = (
                f"counts  {spot['inputs']} calibration inputs × {spot['draws']} fresh draws of the base "
                f"model at σ = {_num(spot['sigma'])} ({spot['seconds']:.2f} s): "
            )
            state = (
                f"OK (smallest Fisher p {spot['min_p']:.3g} ≥ {spot['threshold']:.2g}; seed {spot['seed']})"
                if spot["status"] == "ok"
                else f"MISMATCH: {spot['detail']}"
            )
            lines.append(_wrap(head + state))
    lines.append(_wrap(f"id      {bundle_id}: the digest of the manifest verified here"))
    lines.append(_wrap(NOT_RECOMPUTED))
    return lines


def _adaptive_lines(summary: dict[str, Any]) -> list[str]:
    """What ``rrise run --mc-budget N`` would certify with: the routing rule and its guarantee."""
    rule = (summary.get("adaptive") or {}).get("routing")
    if rule:
        score = rule.get("score_below")
        cond = "" if score is None else f" and ŝ < {_num(score)}"
        step = ", stepping down to half of it, then any radius" if rule.get("step_down") else ""
        route = (
            f"draws where the surrogate radius < {_num(rule['target_radius'])}{cond}{step} "
            f"({rule['chosen_on']})"
        )
    else:
        route = "no routing rule in the bundle: give --require-radius R"
    seq = (summary.get("adaptive") or {}).get("sequential")
    if seq:
        a, b = seq["prior"]
        route += (
            f"; {seq['bound']} bound (prior Beta({_num(a)}, {_num(b)})), {seq['futility']} futility at "
            f"{_num(seq['futility_alpha'])}, first batch {seq['first_batch']}"
        )
    text = summary.get("guarantee_adaptive")
    head = textwrap.fill(f"Adaptive     {route}", width=_WIDTH, subsequent_indent=" " * 13)
    if text is None or text in summary.get("guarantee_filled", ""):
        return [head]
    return [head, _wrap(f"{text} (at --mc-alpha {DEFAULT_MC_ALPHA:g}, the default)")]


def format_inspection(summary: dict[str, Any], problems: list[str]) -> str:
    """Human-readable text of :func:`inspect_bundle`'s result, ending with an "Integrity: OK" or
    "Integrity: FAILED" section that lists every problem.

    Every string is shown with its control characters escaped (``\\n``, ``\\x1b``…): a value the
    manifest, a signature file or a file name on disk brings cannot start a line of its own, such as
    a forged "Integrity: OK"."""
    summary, problems = _printable(summary), [_printable(p) for p in problems]
    lines = [f"Bundle       {summary.get('path')}"]
    if summary.get("id"):
        lines.append(f"Id           {summary['id']}")
        lines += [*_model_lines(summary), *_calibration_lines(summary["calibration"])]
        lines += [*_profile_lines(summary.get("made_with")), "Variants"]
        for v in summary["variants"]:
            lines += _variant_lines(v)
        lines.append(f"Base model   {summary['base_model']} (for audits)")
        parity = (summary.get("export") or {}).get("parity_max_abs_diff")
        if parity is not None:
            lines.append(f"Export       max |logits torch - onnx| = {parity:.3g}")
        lines += ["Guarantee", _wrap(summary["guarantee_filled"])]
        lines += _adaptive_lines(summary)
        lines.append("Files")
        lines += [f"  {name}  sha256 {digest[:16]}…" for name, digest in summary["files"].items()]
        lines.append(_signature_line(summary.get("signature")))
        if "verification" in summary and (summary["verification"] or summary.get("count_verification")):
            lines += _verification_lines(
                summary["verification"], summary.get("count_verification"), summary["id"]
            )
    if problems:
        lines.append(f"Integrity: FAILED ({len(problems)} problem{'s' if len(problems) > 1 else ''})")
        lines += [
            textwrap.fill(f"- {p}", width=_WIDTH, initial_indent="  ", subsequent_indent="    ")
            for p in problems
        ]
    else:
        lines.append("Integrity: OK (every file matches its sha256; no file missing or extra)")
    return "\n".join(lines)
