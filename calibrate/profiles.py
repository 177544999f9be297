"""Named sizes for the pipeline: ``full`` follows docs/CERTIFICATE.md's defaults, ``quick`` fits a laptop CPU.

Every report made with a profile other than ``full`` says so, with what it lowered.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

__all__ = ["FIXED_FIELDS", "PROFILES", "RENAMED", "Profile", "get_profile", "overridden", "profile_help"]

# Field names older versions used → today's (each today the name of the flag that overrides it).
RENAMED = {
    "fresh_steps": "steps",
    "fresh_draws": "draws",
    "fresh_hard_fraction": "hard_fraction",
    "surrogate_augment": "augment",
}


@dataclass(frozen=True)
class Profile:
    name: str
    # base classifier
    base_arch: str
    base_train_size: int
    base_epochs: int
    # Monte Carlo training targets for the surrogate
    n_targets: int
    target_draws: int
    n_selection: int
    # selection inputs that also get full-size MC (N_cal draws), to choose the calibration rule
    n_rule: int
    surrogate_arch: str = field(
        metadata={
            "help": "The surrogate's network: base (start from the base model's weights), a fresh cnn "
            "or cnn-small, or for your own model auto, edge, edge-resnet or package.module:function."
        }
    )
    surrogate_epochs: int
    # conformal calibration
    m: int
    n_cal: int
    alphas: tuple[float, ...]
    beta: float
    # Cohen MC baseline and test set
    n_test: int
    n0: int
    n: int
    mc_alpha: float
    # runtime demo
    video_frames: int
    # high-budget reference MC for violation rates (`rrise reference`, not part of the demo)
    n_ref: int = 100_000
    n_ref_inputs: int = 200
    batch_size: int = 1000
    augment: str = field(
        default="none",
        metadata={
            "help": "Augment the surrogate's training inputs (none, shift, flip, shift+flip). With fresh "
            "targets the draws are made on the augmented image (exact targets, more inputs); with a "
            "fixed store the targets stay the clean image's."
        },
    )
    # Fresh targets (0 steps = off: fit the fixed target store): each step labels ``fresh_batch``
    # images drawn from every training image outside selection and calibration with ``draws``
    # new noisy base-model draws; ``steps·fresh_batch·draws`` evaluations in all.
    steps: int = field(
        default=0,
        metadata={
            "help": "Fresh-target training steps (0 fits the fixed `rrise targets` store). Each costs "
            "batch × draws base-model evaluations."
        },
    )
    draws: int = field(default=4, metadata={"help": "Fresh base-model draws per image and step."})
    fresh_batch: int = 128
    # Hard examples (0 = uniform): this share of the sampling mass goes to pool images in proportion
    # to 1 − their top-class frequency in ``HARD_PROBE_DRAWS`` draws each (counted in the cost).
    hard_fraction: float = field(
        default=0.0,
        metadata={
            "help": "Share of each fresh-target batch drawn towards images the smoothed classifier is "
            "unsure of (found with 16 draws per training image, counted in the cost); 0 = uniform."
        },
    )
    # More draws at the cap (0 = off): calibration inputs whose N_cal draws all fell on one class get
    # this many fresh draws, and the two-stage bound lifts the radius cap to σ·Φ⁻¹(β^(1/cap_draws)).
    cap_draws: int = field(
        default=0,
        metadata={
            "help": "More draws at the cap: calibration inputs whose N_cal draws all fell on one class "
            "get this many fresh draws (> N_cal), lifting the radius cap to σ·Φ⁻¹(β^(1/N₂)); 0 = off."
        },
    )
    # Distil first (0 = off): before the fresh targets, this many steps on which each image gets one
    # noisy base-model vote. Applies only where the surrogate starts as a copy of your own model
    # (`rrise build`): measured there, not on the built-in models.
    distil_steps: int = field(
        default=0,
        metadata={
            "help": "With your own model (`rrise build`) and a surrogate that starts as its copy: a first "
            "phase of this many steps in which each image gets one noisy base-model vote, before the "
            "fresh targets (batch × 1 base-model evaluations a step); 0 = off."
        },
    )
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Profile:
        """A profile from :meth:`to_dict`'s form, also as older versions wrote it (the field names
        in :data:`RENAMED`)."""
        values = {RENAMED.get(k, k): v for k, v in data.items()}
        values["alphas"] = tuple(values["alphas"])
        return cls(**values)


FULL = Profile(
    name="full",
    base_arch="cnn",
    base_train_size=50_000,
    base_epochs=20,
    n_targets=20_000,
    target_draws=256,
    n_selection=2_000,
    n_rule=1_000,
    surrogate_arch="base",
    surrogate_epochs=20,
    m=3_000,
    n_cal=10_000,
    alphas=(0.01, 0.001),
    beta=0.001,
    n_test=1_000,
    n0=100,
    n=10_000,
    mc_alpha=0.001,
    video_frames=200,
    # Fresh targets (benchmarks/results/fresh-targets): 2,000 steps × 128 images × 16 draws = 4.1M
    # base-model evaluations, fewer than the fixed store's 20k × 256 = 5.1M, on every training image
    # outside selection and calibration instead of 20k fixed ones.
    steps=2_000,
    draws=16,
    fresh_batch=128,
    # Half of each batch drawn towards images the smoothed classifier is unsure of
    # (benchmarks/results/full-small/sigma-0.25-levers, section 6): 0.88M probe evaluations more;
    # at σ = 0.25 selection KL 0.00838 → 0.00741, bins +1.24 points (paired SE 0.35) on the
    # selection split, then 86.6/75.2/59.9 → 88.0/77.0/60.8 % at r = 0/0.25/0.5 on the test
    # inputs, abstentions 9.3 → 7.3 %.
    hard_fraction=0.5,
)

QUICK = replace(
    FULL,
    name="quick",
    base_train_size=12_000,
    base_epochs=3,
    n_targets=3_000,
    target_draws=64,
    # Every selection input gets rule-selection MC (0.5M evaluations; 400 left a fit part of 100, too
    # few for the finest score map). More selection inputs would take images from calibration when
    # `rrise build` scales the splits to a small data set.
    n_selection=500,
    n_rule=500,
    surrogate_epochs=4,
    m=500,
    n_cal=1_000,
    alphas=(0.01,),
    n_test=200,
    n0=50,
    n=1_000,
    video_frames=60,
    # Fresh targets, measured on this profile's models (benchmarks/results/fresh-targets): against
    # 3,000 fixed inputs × 64 draws (0.19M evaluations; selection KL 0.0182, q̂ 0.890), 400 steps ×
    # 128 images × 4 draws (0.20M) gave KL 0.0141, q̂ 0.714 and × 16 draws (0.82M) KL 0.0127,
    # q̂ 0.577; selection-split certified accuracy at r = 0/0.25/0.35: 76.8/67.2/61.0, 77.8/70.8/65.0,
    # 79.2/72.5/67.0 %. The extra draws cost little beside the training steps.
    steps=400,
    draws=16,
    fresh_batch=128,
    # Uniform batches: the hard-example probe (16 draws on each of ~55k pool images, 0.88M) would
    # cost more than this profile's whole fresh-target budget, and it was measured at full size only.
    hard_fraction=0.0,
    # Distil first on your own model (docs/RESULTS.md, "Your own model"): 400 steps of single votes
    # (51k evaluations) before the 400 fresh-target steps lowered the selection KL 0.0315 → 0.0280
    # (ResNet 40×40) and 0.0352 → 0.0311 (MobileNet 64×64), and lifted both models' selection-split
    # certified accuracy at r = 0 / 0.25 / 0.5, for about +50 % of the train-surrogate stage's time.
    distil_steps=400,
    note=(
        "Sizes are lowered to finish in minutes on a laptop CPU: N_cal = 1,000 (not 10,000) caps "
        "every RRISE radius below σ·Φ⁻¹(β^(1/N_cal)) (less the rule's shift), and Cohen's n = 1,000 "
        "caps its radius likewise; m = 500, 200 test inputs. Use --profile full for the default sizes "
        "(N_cal = 10,000, m = 3,000, n = 10,000)."
    ),
)

# The quick profile's models with full-size Monte Carlo (N_cal = n = 10,000) on fewer inputs:
# what the certificate reaches at full N, in about 40 minutes of a 2-core CPU.
MEDIUM = replace(
    QUICK,
    name="medium",
    m=1_000,
    n_rule=500,
    n_cal=10_000,
    n0=100,
    n=10_000,
    note=(
        "The quick profile's base model and surrogate with full-size Monte Carlo (N_cal = n = 10,000) "
        "on m = 1,000 calibration and 200 test inputs; --profile full uses m = 3,000 and 1,000 test inputs."
    ),
)

# The full sizes with the edge-sized base model: cnn-small's forward pass is about 3.4× cheaper than
# cnn's on a 2-core CPU (18.7k against 5.5k noisy samples/s through onnxruntime), which brings the
# ~46M base-model evaluations of a full run from about 2.4 h to about 45 min.
FULL_SMALL = replace(
    FULL,
    name="full-small",
    base_arch="cnn-small",
    base_epochs=10,
    note=(
        "Full sizes (fresh targets 2,000 × 128 × 16, half of each batch towards uncertain images, "
        "m = 3,000, N_cal = n = 10,000, 1,000 test inputs) with the edge-sized base model cnn-small "
        "trained for 10 epochs, so that the Monte Carlo fits a CPU; --profile full uses cnn for 20 epochs."
    ),
)

# Sized for sklearn's digits (1,797 images); every profile shrinks to this on that dataset.
DIGITS = replace(
    QUICK,
    name="digits",
    base_arch="cnn-small",
    base_train_size=700,
    base_epochs=8,
    n_targets=400,
    target_draws=32,
    n_selection=100,
    n_rule=0,
    surrogate_epochs=3,
    m=200,
    n_cal=200,
    alphas=(0.05,),
    n_test=60,
    n0=20,
    n=200,
    mc_alpha=0.01,
    video_frames=12,
    n_ref=5_000,
    n_ref_inputs=30,
    batch_size=500,
    steps=0,  # 1,797 images: the fixed targets cover them; keeps the digits pipeline fast
    distil_steps=0,
    note="",
)

# For tests on real Fashion-MNIST in well under a minute: not a meaningful measurement.
SMOKE = replace(
    DIGITS,
    name="smoke",
    base_train_size=3_000,
    base_epochs=4,
    n_targets=1_000,
    n_selection=400,
    n_rule=400,
    n_cal=500,
    note="Smoke-test sizes: nothing here is a meaningful measurement.",
)

PROFILES = {p.name: p for p in (FULL, FULL_SMALL, MEDIUM, QUICK, SMOKE)}


DIGITS_NOTE = (
    "sklearn's digits has 1,797 8×8 images: every size is scaled down to fit it (m = 200, N_cal = 200, "
    "α = 0.05, 60 test inputs). A check that the pipeline runs, not a measurement; install "
    "Fashion-MNIST for one."
)


def profile_help(name: str) -> str:
    """The help of the flag that overrides profile field ``name`` (its metadata), saying that the
    default is the profile's: what a command's option declares instead of restating it.

    >>> profile_help("draws")
    "Fresh base-model draws per image and step (default: the profile's)."
    """
    help_text = {f.name: f.metadata.get("help") for f in fields(Profile)}.get(name)
    if not help_text:
        raise KeyError(f"profile field {name!r} is not a flag")
    return f"{help_text.rstrip('.')} (default: the profile's)."


def get_profile(name: str, dataset: str | None = None) -> Profile:
    """The profile ``name``; on sklearn's small ``digits`` every profile shrinks to fit the data."""
    try:
        profile = PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; expected one of {', '.join(PROFILES)}") from None
    if dataset == "digits" and name != "smoke":
        return replace(DIGITS, name=name, note=DIGITS_NOTE)
    return profile


# What ``profile.FIELD=VALUE`` may not change: the name the folder records and the report's note.
FIXED_FIELDS = ("name", "note")


def overridden(profile: Profile, values: Mapping[str, Any]) -> Profile:
    """``profile`` with ``values`` (field name → value, e.g. ``{"n_targets": 7}``) in its place;
    ValueError naming ``profile.FIELD`` for a field that is unknown or fixed (:data:`FIXED_FIELDS`).

    >>> overridden(PROFILES["smoke"], {"n_targets": 7}).n_targets
    7
    """
    known = [f.name for f in fields(Profile) if f.name not in FIXED_FIELDS]
    for name in values:
        if name not in known:
            raise ValueError(f"profile.{name} is not a profile field you can set (known: {', '.join(known)})")
    return replace(profile, **{k: tuple(v) if k == "alphas" else v for k, v in values.items()})
