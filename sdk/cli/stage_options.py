"""The typed options of the stage commands on a work folder (:mod:`rrise.options` turns each class
into a command's flags, ``--config FILE.yaml`` keys and ``key=value`` overrides).

:class:`WorkdirOptions` is what every stage takes (the folder, and the settings a new folder is
made with: values left out take the folder's recorded ones, then the defaults); each stage with
settings of its own extends it. Choices come from the registries they name (profiles, datasets,
calibration rules, augmentations, score transforms); a flag that overrides a profile field takes
its help from that field (:func:`rrise.calibrate.profiles.profile_help`). Torch-free.

>>> CalibrateOptions(workdir=Path("runs/fm"), alpha=0.01).alpha
0.01
>>> try:
...     CalibrateOptions(workdir=Path("runs/fm"), alpha=0.0)
... except ValueError as exc:
...     print(exc)
--alpha must be in (0, 1), got 0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from rrise.calibrate.augmentations import AUGMENTATIONS
from rrise.calibrate.profiles import PROFILES, profile_help
from rrise.calibrate.rules import RULES
from rrise.datasets import DATASETS
from rrise.scores import TRANSFORMS

__all__ = [
    "AugmentName",
    "CalibrateOptions",
    "DatasetName",
    "DemoOptions",
    "ProfileName",
    "RuleName",
    "ScoreName",
    "SelectRuleOptions",
    "TargetsOptions",
    "TrainSurrogateOptions",
    "WorkdirOptions",
]

ProfileName = Enum("ProfileName", {p: p for p in PROFILES}, type=str, module=__name__)
DatasetName = Enum("DatasetName", {d: d for d in DATASETS}, type=str, module=__name__)
RuleName = Enum("RuleName", {r.name: r.name for r in RULES}, type=str, module=__name__)
AugmentName = Enum("AugmentName", {a: a for a in AUGMENTATIONS}, type=str, module=__name__)
ScoreName = Enum("ScoreName", {t: t for t in TRANSFORMS}, type=str, module=__name__)

_FOLDER = "Work folder"


def _profile_field_help(name: str, default: str | None = None) -> str:
    """The help of the flag overriding profile field ``name``: the field's own help, its default
    ``default`` when given, else the profile's with each profile's value."""
    if default is None:
        values = ", ".join(f"{p.name} {_shown(getattr(p, name))}" for p in PROFILES.values())
        default = f"the profile's: {values}"
    return profile_help(name).removesuffix("(default: the profile's).") + f"(default: {default})."


def _shown(value: object) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _level(flag: str, value: float | None) -> None:
    if value is not None and not 0.0 < value < 1.0:
        raise ValueError(f"{flag} must be in (0, 1), got {value:g}")


def _at_least(flag: str, value: float | None, low: float) -> None:
    if value is not None and value < low:
        raise ValueError(f"{flag} must be >= {low:g}, got {value:g}")


@dataclass(frozen=True, kw_only=True)
class WorkdirOptions:
    """The work folder of a stage, and what a new folder is made with."""

    workdir: Path = field(metadata={"help": "Work folder of the pipeline.", "short": "-w", "group": _FOLDER})
    dataset: DatasetName | None = field(
        default=None,
        metadata={"help": "Dataset (default: the folder's, else fashion-mnist).", "group": _FOLDER},
    )
    profile: ProfileName | None = field(
        default=None,
        metadata={
            "help": "Sizes (rrise.calibrate.profiles): quick runs in minutes on a CPU, full has the "
            "default sizes, smoke is for tests only (default: the folder's, else quick).",
            "group": _FOLDER,
        },
    )
    sigma: float | None = field(
        default=None,
        metadata={"help": "Noise level σ in [0,1]-pixel units (default 0.25).", "group": _FOLDER},
    )
    seed: int | None = field(
        default=None,
        metadata={"help": "Seed for splits, training and Monte Carlo (default 0).", "group": _FOLDER},
    )
    data_dir: Path | None = field(
        default=None,
        metadata={"help": "Folder with MNIST/Fashion-MNIST *-ubyte.gz files.", "group": _FOLDER},
    )
    force: bool = field(default=False, metadata={"help": "Redo the stage even if its outputs exist."})
    no_progress: bool = field(default=False, metadata={"help": "Hide progress bars."})


@dataclass(frozen=True, kw_only=True)
class DemoOptions(WorkdirOptions):
    """``rrise demo``: the whole pipeline, in ``runs/demo`` unless told otherwise."""

    workdir: Path = field(
        default=Path("runs/demo"),
        metadata={"help": "Work folder of the pipeline.", "short": "-w", "group": _FOLDER},
    )


@dataclass(frozen=True, kw_only=True)
class TargetsOptions(WorkdirOptions):
    """``rrise targets``: the Monte Carlo count stores."""

    resume: bool = field(
        default=True,
        metadata={
            "help": "Continue a partial count store if its metadata (base-model hash, σ, N, seed, "
            "dataset, split) matches, refusing and naming the field if not (default); --no-resume "
            "starts over."
        },
    )


@dataclass(frozen=True, kw_only=True)
class TrainSurrogateOptions(WorkdirOptions):
    """``rrise train-surrogate``; None: the profile's value."""

    arch: str | None = field(
        default=None,
        metadata={
            "help": "base: start from the base model's weights (the default); cnn or cnn-small: a fresh "
            "network, e.g. smaller for the edge."
        },
    )
    augment: AugmentName | None = field(default=None, metadata={"help": _profile_field_help("augment")})
    steps: int | None = field(default=None, metadata={"help": _profile_field_help("steps")})
    draws: int | None = field(default=None, metadata={"help": _profile_field_help("draws")})
    hard_fraction: float | None = field(default=None, metadata={"help": _profile_field_help("hard_fraction")})
    distil_steps: int | None = field(
        default=None,
        metadata={
            "help": "A first phase of this many steps in which each image gets one noisy base-model "
            "vote, before the fresh targets (default: the profile's distil_steps for a copy of your own "
            "model, else 0: none; measured in docs/RESULTS.md)."
        },
    )

    def __post_init__(self) -> None:
        _at_least("--steps", self.steps, 0)
        _at_least("--distil-steps", self.distil_steps, 0)
        _at_least("--draws", self.draws, 1)
        if self.hard_fraction is not None and not 0.0 <= self.hard_fraction <= 0.95:
            raise ValueError(f"--hard-fraction must be in [0, 0.95], got {self.hard_fraction:g}")

    def stage_settings(self) -> dict[str, object]:
        """The settings given, as :func:`rrise.calibrate.pipeline.run_stage` takes them."""
        named = {
            "arch": self.arch,
            "augment": None if self.augment is None else self.augment.value,
            "steps": self.steps,
            "draws": self.draws,
            "hard_fraction": self.hard_fraction,
            "distil_steps": self.distil_steps,
        }
        return {k: v for k, v in named.items() if v is not None}


_CAP_DRAWS_SELECT = (
    "Compare the rules as `rrise calibrate --cap-draws N₂` will run them (what it does to "
    "calibration inputs, done to the rule-selection inputs). " + _profile_field_help("cap_draws")
)
_CAP_DRAWS_CALIBRATE = _profile_field_help(
    "cap_draws", "those `rrise select-rule --cap-draws` chose the rule with, else the profile's"
)


_CLIP_HELP = (
    "Clip each calibration score at the value beyond which that input abstains anyway (the same "
    "guarantee, a quantile never larger); --no-clip-at-abstention: the plain score."
)


@dataclass(frozen=True, kw_only=True)
class SelectRuleOptions(WorkdirOptions):
    """``rrise select-rule``."""

    cap_draws: int | None = field(default=None, metadata={"help": _CAP_DRAWS_SELECT})
    clip_at_abstention: bool = field(
        default=True,
        metadata={"help": "Compare the rules with the scores `rrise calibrate` will use. " + _CLIP_HELP},
    )

    def __post_init__(self) -> None:
        _at_least("--cap-draws", self.cap_draws, 0)


@dataclass(frozen=True, kw_only=True)
class CalibrateOptions(WorkdirOptions):
    """``rrise calibrate``; None: the profile's (or the selected rule's) value."""

    alpha: float | None = field(
        default=None, metadata={"help": "Miscoverage α (default: the profile's, 0.01)."}
    )
    beta: float | None = field(default=None, metadata={"help": "MC lower-bound level β (default 0.001)."})
    delta: float | None = field(
        default=None,
        metadata={
            "help": "Training-conditional (PAC) quantile: holds with probability ≥ 1−δ over calibration."
        },
    )
    score: ScoreName = field(default=ScoreName("probit"), metadata={"help": "Score transform T."})
    rule: RuleName | None = field(
        default=None,
        metadata={"help": "Calibration rule (default: the one `rrise select-rule` chose, else single)."},
    )
    bins: int | None = field(
        default=None,
        metadata={
            "help": "Override the rule's number of confidence bins (Mondrian quantiles, edges from the "
            "selection split); 1 = one quantile."
        },
    )
    cap_draws: int | None = field(default=None, metadata={"help": _CAP_DRAWS_CALIBRATE})
    clip_at_abstention: bool = field(default=True, metadata={"help": _CLIP_HELP})

    def __post_init__(self) -> None:
        for flag, value in (("--alpha", self.alpha), ("--beta", self.beta), ("--delta", self.delta)):
            _level(flag, value)
        _at_least("--bins", self.bins, 1)
        _at_least("--cap-draws", self.cap_draws, 0)

    def stage_settings(self) -> dict[str, object]:
        """The settings given, as :func:`rrise.calibrate.pipeline.run_stage` takes them."""
        named = {
            "alpha": self.alpha,
            "beta": self.beta,
            "delta": self.delta,
            "score": None if self.score.value == "probit" else self.score.value,
            "bins": self.bins,
            "rule": None if self.rule is None else self.rule.value,
            "cap_draws": self.cap_draws,
            "clip_at_abstention": None if self.clip_at_abstention else False,
        }
        return {k: v for k, v in named.items() if v is not None}
