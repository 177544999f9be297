"""The manifest schema: every value of a bundle's ``manifest.json`` typed, in range and consistent.

:func:`validate_manifest` is the one door :meth:`rrise.Bundle.load` lets a manifest through. Types and
structure come from the typed Structs below; ranges and cross-key consistency (``p_cap`` = β^(1/N),
the label count, σ against the calibration's σ, a quantile no calibration input could have given, too
few calibration inputs for α) from the checks after them. Every error names its key path, e.g.
``calibration.alpha: must be in (0, 1), got 2``.

Why msgspec: one small wheel with no dependencies (so the edge runtime stays small), typed Structs
that state what a manifest is in one place, validation in C that reports the key path of a bad
value, and it also encodes msgpack, the record format. pydantic v2 validates as well but brings
pydantic-core, typing-extensions and annotated-types and costs more at import on an edge device;
jsonschema checks dicts without typing them and needs its own language for ranges. The range and
consistency rules are plain Python because their messages must show the value and say what it
means, which msgspec's constraint messages do not.
"""

from __future__ import annotations

import math
import re
import types
import typing
from typing import Any, Literal

import msgspec
import numpy as np

from .calibration import Calibration, min_calibration_size, record_fields
from .numerics import MICRO_BATCH_LIMIT
from .onnx_session import CALIBRATED_WITH as ORT_NUMERICS
from .scores import conformal_scores, p_cap
from .sequential import BOUND_NAME, FUTILITY_NAME

__all__ = [
    "MANIFEST",
    "SCHEMA_VERSION",
    "CONTROL_CHARACTERS",
    "SIGNATURE",
    "MadeWith",
    "Manifest",
    "ManifestError",
    "quantile_floor",
    "required_schema_version",
    "smallest_calibration_size",
    "unsafe_name",
    "unsafe_value",
    "validate_manifest",
]

SCHEMA_VERSION = 2  # the newest manifest schema this SDK reads; it reads every older one too
# Calibration keys an SDK reading schema 1 would drop, then subtract q̂ alone (not q̂·u(z), not the
# bin's quantile, not after the map g): a manifest using any of them needs schema 2.
SCHEMA_2_CALIBRATION_KEYS = ("score_scale_x", "score_map_x", "bin_edges")
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"  # the detached signature: never listed in the manifest it signs

# Plain constants (no torch, numpy or cv2 imports): the runtime's preprocessing accepts these.
PRECISIONS = ("fp32", "int8", "fp16")  # rrise.export.precision.PRECISIONS
BACKENDS = ("onnxruntime", "tensorrt")
OUTPUT_KINDS = ("logits", "probs")
COLORS = {"gray": 1, "rgb": 3, "bgr": 3}
CALIBRATED_WITH = (*ORT_NUMERICS, "tensorrt")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(ValueError):
    """A manifest value that is missing, mistyped, out of range or inconsistent; ``problems`` lists
    each one as ``key.path: what is wrong, got VALUE``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


class _Struct(msgspec.Struct, kw_only=True):
    """Unknown keys are kept out of the typed view but allowed: newer writers may add keys."""


class ModelInput(_Struct):
    name: str
    shape: list[int | None]
    dtype: Literal["float32"]
    range: list[float]


class ModelOutput(_Struct):
    name: str
    kind: Literal[OUTPUT_KINDS]


class Model(_Struct):
    file: str
    input: ModelInput
    output: ModelOutput
    num_classes: int
    sha256: str | None = None
    labels: list[str] | None = None


class Preprocess(_Struct):
    color: Literal[tuple(COLORS)]
    resize: list[int]
    interpolation: Literal["area", "linear", "nearest", "cubic"]
    layout: Literal["NCHW"]
    crop: Literal["none", "center"] | None = None
    crop_fraction: float | None = None


class Smoothing(_Struct):
    sigma: float


def _record_struct() -> type[msgspec.Struct]:
    """The manifest's ``calibration``, typed from :func:`rrise.calibration.record_fields` (the
    fields of :class:`rrise.CalibrationSpec` and :class:`rrise.Calibration`, declared there once):
    lists for tuples, and a key the record need not hold defaults to null or an empty list."""
    spec = []
    for name, kind, required in record_fields():
        if typing.get_origin(kind) is tuple:
            spec.append((name, list[typing.get_args(kind)[0]], msgspec.field(default_factory=list)))
        elif required:
            spec.append((name, kind))
        else:
            spec.append((name, kind | None, None))
    return msgspec.defstruct("CalibrationRecord", spec, bases=(_Struct,), kw_only=True, module=__name__)


CalibrationRecord = _record_struct()


class FileEntry(_Struct):
    file: str
    sha256: str | None = None


class BaseEngine(_Struct):
    """A TensorRT engine of the base classifier (``base_model.engines``, optional): built on one GPU
    and TensorRT version by ``rrise-export --engine tensorrt``, run by adaptive certification."""

    file: str
    sha256: str
    trt_version: str
    compute_capability: str
    max_batch: int | None = None


class BaseModel(FileEntry):
    engines: list[BaseEngine] | None = None


class Variant(_Struct):
    precision: Literal[PRECISIONS]
    backend: Literal[BACKENDS]
    file: str
    quantile: float | None
    sha256: str | None = None
    bin_quantiles: list[float | None] | None = None
    calibrated_with: Literal[CALIBRATED_WITH] | None = None
    max_batch: int | None = None
    needs_recalibration: str | None = None
    output_kind: Literal[OUTPUT_KINDS] | None = None
    monitor: dict[str, Any] | None = None  # its contents are rrise.monitor's to check
    trt_version: str | None = None
    compute_capability: str | None = None


class MadeWith(_Struct):
    """How the bundle was made: the pipeline profile (``rrise demo/build --profile``) and, for any
    profile other than ``full``, what it lowered. Optional: bundles made by ``rrise-export`` alone
    have no profile."""

    profile: str
    profile_note: str | None = None


class AdaptiveRouting(_Struct):
    """Which frames adaptive certification spends base-model draws on when no radius is required
    (``rrise run --mc-budget N`` without ``--require-radius``): those whose surrogate radius is below
    ``target_radius`` and whose ŝ is below ``score_below`` (null: no ŝ condition); ``step_down``:
    a frame whose draws show ``target_radius`` out of reach aims at half of it, then at any radius;
    ``chosen_on`` says where it was chosen (the selection split, never the calibration one)."""

    score_below: float | None
    target_radius: float
    chosen_on: str
    step_down: bool = False
    rule: str | None = None
    mc_budget: int | None = None
    max_mean_draws: float | None = None
    selection_inputs: int | None = None
    selection_mean_draws: float | None = None
    selection_certified_accuracy: list[float] | None = None


class AdaptiveSequential(_Struct):
    """How the sequential test bounds and stops (:func:`rrise.sequential.stated_stopping`): the
    ``bound`` and its mixture ``prior``, the ``futility`` rule and its level, the ``first_batch``.
    The routing rule's numbers were measured with them, and the runtime runs them."""

    bound: str
    prior: list[float]
    futility: str
    futility_alpha: float
    first_batch: int


class Adaptive(_Struct):
    """Adaptive certification's settings stated by the bundle (optional): the ``routing`` rule and
    the ``sequential`` test's stopping rule."""

    routing: AdaptiveRouting | None = None
    sequential: AdaptiveSequential | None = None


class Manifest(_Struct):
    schema_version: int
    rrise_version: str
    created: str
    model: Model
    preprocess: Preprocess
    smoothing: Smoothing
    calibration: CalibrationRecord
    base_model: BaseModel
    variants: list[Variant]
    guarantee: str
    files: dict[str, str]
    export: dict[str, Any] | None = None
    made_with: MadeWith | None = None
    adaptive: Adaptive | None = None


def validate_manifest(obj: Any) -> Manifest:
    """The typed manifest of the parsed JSON ``obj``, or :class:`ManifestError` naming every bad key.

    Structure and types are checked first (the first error is reported); then every range and
    consistency rule runs and all of their problems are reported together; then every value, unknown
    keys' included, must be a finite number or a string without control characters
    (:func:`unsafe_value`)."""
    if not isinstance(obj, dict):
        raise ManifestError([f"the manifest must be a JSON object, got {type(obj).__name__}"])
    _check_schema_version(obj)
    try:
        manifest = msgspec.convert(obj, Manifest)
    except msgspec.ValidationError as exc:
        raise ManifestError([_structural_message(str(exc), obj)]) from None
    problems = _Problems()
    _check_model(manifest, problems)
    _check_calibration(manifest, problems)
    _check_variants(manifest, problems)
    _check_files(manifest, problems)
    if manifest.adaptive is not None:
        _check_adaptive(manifest.adaptive, problems)
    if manifest.made_with is not None:
        problems.require(
            bool(manifest.made_with.profile.strip()), "made_with.profile", "be a profile name", ""
        )
    if problems:
        raise ManifestError(problems)
    unsafe = unsafe_value(obj)  # after the typed checks, whose messages say what each key means
    if unsafe is not None:
        raise ManifestError([unsafe])
    return manifest


def required_schema_version(manifest: dict[str, Any]) -> int:
    """The oldest manifest schema that reads ``manifest``'s certificate right: 2 when its calibration
    applies more than one quantile at deployment (a score scale u, a score map g or confidence bins,
    :mod:`rrise.scores`), which a schema-1 reader would drop and misapply; else 1, so a plain
    one-quantile bundle stays readable by older SDKs.

    >>> required_schema_version({"calibration": {"quantile": 0.4}, "variants": [{"quantile": 0.4}]})
    1
    >>> required_schema_version({"calibration": {"quantile": 0.4, "score_scale_x": [0.0, 1.0]}})
    2
    """
    cal, variants = manifest.get("calibration"), manifest.get("variants")
    cal = cal if isinstance(cal, dict) else {}
    variants = variants if isinstance(variants, list) else []
    uses = any(cal.get(k) for k in SCHEMA_2_CALIBRATION_KEYS) or any(
        isinstance(v, dict) and v.get("bin_quantiles") for v in variants
    )
    return 2 if uses else 1


def _check_schema_version(obj: dict[str, Any]) -> None:
    """Refuse a schema newer than this SDK reads (by name), and one older than the manifest's
    calibration needs (an older SDK would misread it)."""
    version = obj.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise ManifestError(
            [f"bundle schema {version} is newer than this SDK reads ({SCHEMA_VERSION}): upgrade rrise"]
        )
    if version not in range(1, SCHEMA_VERSION + 1) or isinstance(version, bool):
        why = "missing" if version is None else f"unknown schema_version {version!r}"
        raise ManifestError(
            [
                f"schema_version: {why} (this rrise reads 1 to {SCHEMA_VERSION}); "
                "upgrade rrise or re-export the bundle"
            ]
        )
    needed = required_schema_version(obj)
    if version < needed:
        raise ManifestError(
            [
                f"schema_version: {version}, but its calibration (score scale, score map or bins) needs "
                f"schema {needed}: an older SDK would apply its quantile alone; re-export the bundle"
            ]
        )


# Characters that change how text is laid out rather than what it says: C0 and C1 controls (a newline
# in a label could print a forged "Integrity: OK" line in `rrise inspect`), line and paragraph
# separators, and the bidirectional overrides that reorder what a terminal shows.
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def unsafe_value(obj: Any) -> str | None:
    """The first value anywhere in parsed JSON ``obj`` (unknown keys included) that no manifest may
    hold, as ``key.path: why``, or None: a number that is NaN or infinite (not JSON, and no bundle id
    could be computed), or a string, value or key, with a control character (:data:`CONTROL_CHARACTERS`).
    Walked without recursion, so any nesting depth is safe.

    >>> unsafe_value({"extra": {"x": [1.0, float("nan")]}})
    'extra.x[1]: must be a finite number, got nan (NaN and Infinity are not JSON)'
    >>> print(unsafe_value({"made_with": {"profile": "quick" + chr(10) + "Integrity: OK"}}))
    made_with.profile: must hold no control character (such as a newline), got 'quick\\nIntegrity: OK'
    """
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        path, value = stack.pop()
        where = path or "the manifest"
        if isinstance(value, float) and not math.isfinite(value):
            return f"{where}: must be a finite number, got {value!r} (NaN and Infinity are not JSON)"
        if isinstance(value, str) and CONTROL_CHARACTERS.search(value):
            return f"{where}: must hold no control character (such as a newline), got {_show(value)}"
        if isinstance(value, dict):
            for key, item in reversed(list(value.items())):
                at = f"{path}.{key}" if path else str(key)
                if isinstance(key, str) and CONTROL_CHARACTERS.search(key):
                    return f"{where}: a key must hold no control character, got {_show(key)}"
                stack.append((at, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in reversed(list(enumerate(value))))
    return None


# --- consistency and ranges -------------------------------------------------------------------------
class _Problems(list):
    def require(self, ok: bool, path: str, must: str, value: Any) -> bool:
        """Record ``path: must MUST, got VALUE`` unless ``ok``; return ``ok``."""
        if not ok:
            self.append(f"{path}: must {must}, got {_show(value)}")
        return ok

    def in_range(self, path: str, value: float, lo: float, hi: float, *, closed_hi: bool = False) -> bool:
        ok = math.isfinite(value) and lo < value and (value <= hi if closed_hi else value < hi)
        interval = f"({lo:g}, {hi:g}{']' if closed_hi else ')'}" if math.isfinite(hi) else f"> {lo:g}"
        return self.require(ok, path, f"be {'in ' if math.isfinite(hi) else ''}{interval}", value)

    def sha(self, path: str, value: str | None) -> None:
        if value is not None:
            self.require(bool(_SHA256.match(value)), path, "be a sha256 hex digest", value)

    def file_name(self, path: str, value: str) -> None:
        self.require(not unsafe_name(value), path, "be a relative path inside the bundle", value)


def unsafe_name(name: object) -> bool:
    """A manifest file name that is not a plain relative path inside the bundle folder."""
    if not isinstance(name, str) or not name or "\\" in name:
        return True
    parts = name.split("/")
    return name.startswith("/") or any(p in ("", ".", "..") for p in parts) or ":" in parts[0]


def _check_model(m: Manifest, problems: _Problems) -> None:
    model, pre = m.model, m.preprocess
    problems.file_name("model.file", model.file)
    problems.sha("model.sha256", model.sha256)
    shape = model.input.shape
    ok = problems.require(len(shape) == 4, "model.input.shape", "be [batch, C, H, W]", shape)
    ok &= problems.require(
        all(d is None or d >= 1 for d in shape), "model.input.shape", "hold sizes >= 1 (or null)", shape
    )
    problems.require(
        model.input.range == [0.0, 1.0],
        "model.input.range",
        "be [0, 1] (σ is in [0,1]-pixel units)",
        model.input.range,
    )
    problems.require(model.num_classes >= 2, "model.num_classes", "be an integer >= 2", model.num_classes)
    if model.labels is not None:
        problems.require(
            len(model.labels) == model.num_classes,
            "model.labels",
            f"hold one name per class (num_classes = {model.num_classes})",
            f"{len(model.labels)} labels",
        )
    ok &= problems.require(
        len(pre.resize) == 2 and min(pre.resize) >= 1, "preprocess.resize", "be [height, width]", pre.resize
    )
    if pre.crop_fraction is not None:
        problems.in_range("preprocess.crop_fraction", pre.crop_fraction, 0.0, 1.0, closed_hi=True)
    if ok:
        channels, height, width = shape[1:]
        problems.require(
            channels in (None, COLORS[pre.color]),
            "preprocess.color",
            f"give the model input's {channels} channel(s)",
            pre.color,
        )
        problems.require(
            height in (None, pre.resize[0]) and width in (None, pre.resize[1]),
            "preprocess.resize",
            f"match the model input {shape}",
            pre.resize,
        )
    problems.in_range("smoothing.sigma", m.smoothing.sigma, 0.0, math.inf)


# The former name of the fewest-inputs rule; one function, in rrise.calibration.
smallest_calibration_size = min_calibration_size


def quantile_floor(
    num_classes: int, cap: float, score: str, score_map: tuple | None, score_scale: tuple | None = None
) -> float:
    """The smallest conformal score any calibration input can have: the top-class probability is at
    least 1/K and the MC lower bound at most p_cap, so the numerator is d ≥ g(T(min(1/K, p_cap))) −
    T(p_cap), and with a scale u the score is at least d/min u (d < 0) or d/max u (d ≥ 0). A quantile
    below it was not computed from calibration scores (and would inflate every radius)."""
    d = float(conformal_scores(np.array([1.0 / num_classes]), np.array([cap]), cap, score, score_map)[0])
    if score_scale is None:
        return d
    return d / (min(score_scale[1]) if d < 0 else max(score_scale[1]))


def _check_calibration(m: Manifest, problems: _Problems) -> None:
    cal, sigma, before = m.calibration, m.smoothing.sigma, len(problems)
    ok = problems.in_range("calibration.alpha", cal.alpha, 0.0, 1.0)
    ok &= problems.in_range("calibration.beta", cal.beta, 0.0, 1.0)
    if ok:
        ok &= problems.require(
            cal.alpha + cal.beta < 1, "calibration.alpha + beta", "be < 1", cal.alpha + cal.beta
        )
    if cal.delta is not None:
        ok &= problems.in_range("calibration.delta", cal.delta, 0.0, 1.0)
    ok &= problems.require(cal.n_mc >= 1, "calibration.n_mc", "be an integer >= 1", cal.n_mc)
    if cal.cap_draws is not None:
        ok &= problems.require(
            cal.cap_draws > cal.n_mc, "calibration.cap_draws", f"exceed n_mc ({cal.n_mc})", cal.cap_draws
        )
    if cal.sigma is not None:
        problems.require(
            cal.sigma == sigma, "calibration.sigma", f"equal smoothing.sigma ({sigma!r})", cal.sigma
        )
    if not ok:
        return
    draws, name = (cal.cap_draws, "cap_draws") if cal.cap_draws is not None else (cal.n_mc, "n_mc")
    cap = p_cap(cal.beta, draws)
    problems.require(
        math.isclose(cal.p_cap, cap, rel_tol=1e-9),
        "calibration.p_cap",
        f"be beta^(1/{name}) = {cap!r}",
        cal.p_cap,
    )
    bins = len(cal.bin_edges) + 1
    need = min_calibration_size(cal.alpha, cal.delta, bins)
    problems.require(
        cal.m >= need, "calibration.m", f"be >= {need} (the fewest inputs that work for alpha)", cal.m
    )
    if len(problems) > before:
        return
    record = {k: v for k, v in msgspec.to_builtins(cal).items() if v is not None}
    try:  # confidence bins, the score map and scale: Calibration is the one home of their rules
        Calibration.from_dict(record, sigma=sigma)
    except ValueError as exc:
        problems.append(f"calibration: {exc}")
        return
    score_map = (tuple(cal.score_map_x), tuple(cal.score_map_y)) if cal.score_map_x else None
    scale = (tuple(cal.score_scale_x), tuple(cal.score_scale_y)) if cal.score_scale_x else None
    floor = quantile_floor(m.model.num_classes, cap, cal.score, score_map, scale)
    _quantile("calibration.quantile", cal.quantile, floor, problems)
    for i, q in enumerate(cal.bin_quantiles):
        if q is not None:
            _quantile(f"calibration.bin_quantiles[{i}]", q, floor, problems)
    for i, v in enumerate(m.variants):
        if v.quantile is not None:
            _quantile(f"variants[{i}].quantile", v.quantile, floor, problems)
        for j, q in enumerate(v.bin_quantiles or ()):
            if q is not None:
                _quantile(f"variants[{i}].bin_quantiles[{j}]", q, floor, problems)


def _quantile(path: str, q: float, floor: float, problems: _Problems) -> None:
    if problems.require(math.isfinite(q), path, "be a finite number", q):
        problems.require(
            q >= floor - 1e-9 * (1 + abs(floor)),
            path,
            f"be >= {floor:.6g}, the smallest score a calibration input can have",
            q,
        )


def _check_variants(m: Manifest, problems: _Problems) -> None:
    if not problems.require(bool(m.variants), "variants", "be a non-empty list", m.variants):
        return
    bins = len(m.calibration.bin_edges) + 1 if m.calibration.bin_edges else 0
    seen: set[tuple[str, str]] = set()
    for i, v in enumerate(m.variants):
        at = f"variants[{i}]"
        problems.file_name(f"{at}.file", v.file)
        problems.sha(f"{at}.sha256", v.sha256)
        key = (v.precision, v.backend)
        problems.require(key not in seen, at, "be the only variant of its precision/backend", "/".join(key))
        seen.add(key)
        if v.monitor is not None:
            _check_monitor(at, v.monitor, m, problems)
        if v.quantile is None:
            problems.require(
                bool(v.needs_recalibration),
                f"{at}.quantile",
                "be a number, or null with needs_recalibration saying why",
                None,
            )
            continue
        if v.calibrated_with is None:
            problems.append(
                f"{at}.calibrated_with: missing: a calibrated variant says which numerics its quantile "
                f"holds for ({', '.join(CALIBRATED_WITH)}); re-export the bundle"
            )
        else:
            problems.require(
                (v.calibrated_with == "tensorrt") == (v.backend == "tensorrt"),
                f"{at}.calibrated_with",
                f"match its backend {v.backend!r}",
                v.calibrated_with,
            )
        problems.require(
            v.max_batch is not None and 1 <= v.max_batch <= MICRO_BATCH_LIMIT,
            f"{at}.max_batch",
            f"be an integer in [1, {MICRO_BATCH_LIMIT}] (the batch sizes its quantile was checked at)",
            v.max_batch,
        )
        if bins:
            n = len(v.bin_quantiles or ())
            problems.require(
                n == bins,
                f"{at}.bin_quantiles",
                f"hold {bins} quantiles (one per confidence bin)",
                v.bin_quantiles,
            )


def _check_monitor(at: str, entry: dict[str, Any], m: Manifest, problems: _Problems) -> None:
    """A variant's ``monitor`` entry, checked by :func:`rrise.monitor.validate_monitor` (the shift
    reference and its ``ood`` test, read as the runtime reads them)."""
    from .monitor import validate_monitor

    channels = m.model.input.shape[1] if len(m.model.input.shape) == 4 else None
    try:
        validate_monitor(
            entry, num_classes=m.model.num_classes, channels=channels or COLORS[m.preprocess.color]
        )
    except ValueError as exc:
        problems.append(f"{at}.{exc}")


def _check_sequential(seq: AdaptiveSequential, problems: _Problems) -> None:
    at = "adaptive.sequential"
    problems.require(seq.bound == BOUND_NAME, f"{at}.bound", f"be {BOUND_NAME!r}", seq.bound)
    problems.require(seq.futility == FUTILITY_NAME, f"{at}.futility", f"be {FUTILITY_NAME!r}", seq.futility)
    problems.require(
        len(seq.prior) == 2 and all(math.isfinite(v) and v > 0 for v in seq.prior),
        f"{at}.prior",
        "be two positive numbers [a, b] (the Beta prior)",
        seq.prior,
    )
    problems.in_range(f"{at}.futility_alpha", seq.futility_alpha, 0.0, 1.0)
    problems.require(seq.first_batch >= 1, f"{at}.first_batch", "be an integer >= 1", seq.first_batch)


def _check_adaptive(adaptive: Adaptive, problems: _Problems) -> None:
    if adaptive.sequential is not None:
        _check_sequential(adaptive.sequential, problems)
    rule = adaptive.routing
    if rule is None:
        return
    problems.in_range("adaptive.routing.target_radius", rule.target_radius, 0.0, math.inf)
    if rule.score_below is not None:
        problems.require(
            math.isfinite(rule.score_below) and rule.score_below >= 0,
            "adaptive.routing.score_below",
            "be a number >= 0, or null for no condition on the score",
            rule.score_below,
        )
    problems.require(
        rule.chosen_on.strip() not in ("", "calibration split"),
        "adaptive.routing.chosen_on",
        "name the split the rule was chosen on (never the calibration split)",
        rule.chosen_on,
    )
    if rule.mc_budget is not None:
        problems.require(
            rule.mc_budget >= 1, "adaptive.routing.mc_budget", "be an integer >= 1", rule.mc_budget
        )


def _check_files(m: Manifest, problems: _Problems) -> None:
    problems.file_name("base_model.file", m.base_model.file)
    problems.sha("base_model.sha256", m.base_model.sha256)
    seen: set[tuple[str, str]] = set()
    for i, e in enumerate(m.base_model.engines or ()):
        at = f"base_model.engines[{i}]"
        problems.file_name(f"{at}.file", e.file)
        problems.require(
            m.files.get(e.file) == e.sha256, f"{at}.sha256", "be its file's sha256 in files", e.sha256
        )
        key = (e.trt_version, e.compute_capability)
        problems.require(key not in seen, at, "be the only engine of its TensorRT version and GPU", e.file)
        seen.add(key)
        if e.max_batch is not None:
            problems.require(e.max_batch >= 1, f"{at}.max_batch", "be an integer >= 1", e.max_batch)
    for name, digest in m.files.items():
        at = f"files[{name!r}]"
        problems.file_name(at, name)
        problems.require(
            name not in (MANIFEST, SIGNATURE), at, "not list the manifest or its signature", name
        )
        problems.sha(at, digest)


# --- structural errors in words -----------------------------------------------------------------------
_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_TOKENS = re.compile(r"\.([^.\[\]]+)|\[(\d+|\.\.\.)\]")
_TYPE_WORDS = {
    "float": "a number",
    "int": "an integer",
    "str": "a string",
    "bool": "true or false",
    "object": "an object",
    "array": "a list",
    "null": "null",
}


def _structural_message(message: str, obj: Any) -> str:
    """msgspec's ``Expected `float`, got `str` - at `$.calibration.alpha``` → ``calibration.alpha:
    must be a number, got 'x'``."""
    match = _AT.match(message)
    what, raw_path = match["what"], match["path"] or ""
    tokens = [name or (int(index) if index.isdigit() else index) for name, index in _TOKENS.findall(raw_path)]
    path = raw_path.lstrip(".") or "the manifest"
    missing = re.match(r"Object missing required field `([^`]+)`", what)
    if missing:
        return f"{'' if not raw_path else path + '.'}{missing[1]}: missing (a required key)"
    value = _lookup(obj, tokens)
    expected = re.match(r"Expected `([^`]+)`", what)
    if expected:
        words = " or ".join(_TYPE_WORDS.get(t.strip(), t.strip()) for t in expected[1].split("|"))
        return f"{path}: must be {words}, got {_show(value)}"
    if what.startswith("Invalid enum value"):
        choices = _choices(tokens)
        return f"{path}: must be one of {', '.join(choices)}, got {_show(value)}"
    return f"{path}: {what[:1].lower()}{what[1:]}"


def _lookup(obj: Any, tokens: list) -> Any:
    for t in tokens:
        try:
            obj = obj[t]
        except (KeyError, IndexError, TypeError):
            return "?"
    return obj


def _choices(tokens: list) -> list[str]:
    """The allowed values of the Literal field at ``tokens`` (list indices step into list items)."""
    tp: Any = Manifest
    for t in tokens:
        while typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        step_in = isinstance(t, int) or t == "..."  # a list item or a dict value
        tp = typing.get_args(tp)[-1] if step_in else typing.get_type_hints(tp)[t]
    while typing.get_origin(tp) is not Literal and typing.get_args(tp):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return [repr(a) for a in typing.get_args(tp)]


def _show(value: Any) -> str:
    """A value as the manifest writes it (``2``, not ``2.0``), cut at 80 characters."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
