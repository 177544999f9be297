"""The typed options of ``rrise build``: :class:`BuildOptions`, imported as
``from rrise.calibrate.options import BuildOptions``.

One frozen dataclass declares every flag once (name, type, default, help): the CLI's flags, a
config file's keys and ``key=value`` overrides are all made from it, and Python callers pass it to
:func:`rrise.calibrate.build`. Field names are the flag names with ``-`` → ``_``; the choices of an
enum field come from the registry they name (:data:`~rrise.calibrate.profiles.PROFILES`,
:data:`~rrise.calibrate.specs.CHANNELS`, :data:`~rrise.calibrate.specs.OUTPUT_KINDS`). Importing this
module loads neither torch nor numpy (``rrise build --help`` stays light).

>>> from rrise.calibrate.options import BuildOptions
>>> o = BuildOptions(model="model.onnx", data="images/", workdir="runs/mine", mean=0.5, std=0.25)
>>> o.profile.value, o.sigma, o.mean, o.workdir
('quick', 0.25, (0.5,), PosixPath('runs/mine'))
>>> BuildOptions(model="m.onnx", data="d", workdir="w", sigma=2)
Traceback (most recent call last):
...
ValueError: --sigma must be in (0, 1] ([0,1]-pixel units), got 2
"""

from __future__ import annotations

import enum
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .profiles import PROFILES
from .specs import CHANNELS, OUTPUT_KINDS

__all__ = ["BuildOptions", "Channels", "OutputKind", "ProfileName"]

ProfileName = enum.Enum("ProfileName", {name: name for name in PROFILES}, type=str)
Channels = enum.Enum("Channels", {name: name for name in CHANNELS}, type=str)
OutputKind = enum.Enum("OutputKind", {name: name for name in OUTPUT_KINDS}, type=str)

_MODEL, _IMAGES, _RUN = "Model", "Images", "Run"


def _enum(value: object, kind: type[enum.Enum], flag: str) -> enum.Enum | None:
    if value is None or isinstance(value, kind):
        return value
    try:
        return kind(str(value))
    except ValueError:
        choices = ", ".join(m.value for m in kind)
        raise ValueError(f"{flag} must be one of {choices}, got {value!r}") from None


def _floats(value: object, flag: str) -> tuple[float, ...] | None:
    """One float or several (a sequence, or one comma-separated string) as a tuple."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value
    if isinstance(items, (int, float)):
        items = [items]
    try:
        out = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise ValueError(f"{flag} must be one number or one per channel, got {value!r}") from None
    if not out or not all(math.isfinite(v) for v in out):
        raise ValueError(f"{flag} must be finite numbers, got {value!r}")
    return out


def _size(value: object) -> tuple[int, int] | None:
    """``--input-size``: H W (one integer means a square input)."""
    if value is None:
        return None
    items = [value] * 2 if isinstance(value, int) and not isinstance(value, bool) else list(value)
    if len(items) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in items):
        raise ValueError(f"--input-size must be two positive integers H W, got {value!r}")
    return (items[0], items[1])


def _text(value: object) -> str | None:
    return None if value is None else os.fspath(value)


def _path(value: object) -> Path | None:
    return None if value is None else Path(value)


@dataclass(frozen=True, kw_only=True)
class BuildOptions:
    """Every flag of ``rrise build`` (DESIGN §3b): the user's model and images → ``WORKDIR/bundle``.

    Plain Python values are accepted where the field's type is stricter (a str for an enum, one
    float for ``mean``/``std``, one int for a square ``input_size``, a str for a Path); each is
    checked here, raising ``ValueError`` with one line naming the flag.
    """

    model: str = field(
        metadata={
            "help": "Your classifier: path.onnx, path.pt2 (torch.export) or package.module:attribute "
            "(an nn.Module, or a factory: a function called with no arguments that returns one, "
            "importable from the current folder or the Python path).",
            "group": _MODEL,
        }
    )
    data: str = field(
        metadata={
            "help": "Images the model did NOT train on, from the deployment distribution: an ImageFolder "
            "(`root/<class>/<image>`; a class's index is the position of its folder name in sorted "
            "order, as torchvision's ImageFolder numbers them: your model's outputs must follow "
            "that order), an .npz (images, labels, optional classes) or a built-in name.",
            "group": _IMAGES,
        }
    )
    workdir: Path = field(metadata={"help": "Work folder of the pipeline.", "group": _RUN})
    sigma: float = field(
        default=0.25, metadata={"help": "Noise level σ in [0,1]-pixel units.", "group": _RUN}
    )
    profile: ProfileName = field(
        default=ProfileName("quick"),
        metadata={"help": "Sizes: quick, medium, full, full-small or smoke (tests only).", "group": _RUN},
    )
    seed: int = field(
        default=0, metadata={"help": "Seed for splits, training and Monte Carlo.", "group": _RUN}
    )
    train_data: str | None = field(
        default=None,
        metadata={"help": "Images the model trained on (used only as surrogate targets).", "group": _IMAGES},
    )
    data_dir: Path | None = field(
        default=None,
        metadata={
            "help": "Folder with the files of a built-in DATA (MNIST/Fashion-MNIST *-ubyte.gz).",
            "group": _IMAGES,
        },
    )
    output: str | None = field(
        default=None, metadata={"help": "Which model output holds the [B, K] scores.", "group": _MODEL}
    )
    output_kind: OutputKind | None = field(
        default=None, metadata={"help": "logits or probs (default: detected).", "group": _MODEL}
    )
    input_size: tuple[int, int] | None = field(
        default=None,
        metadata={"help": "H W of the model input, where the model does not fix it.", "group": _MODEL},
    )
    channels: Channels | None = field(
        default=None, metadata={"help": "rgb (default), bgr or gray.", "group": _MODEL}
    )
    mean: tuple[float, ...] | None = field(
        default=None,
        metadata={
            "help": "Normalization mean the model expects: one value or one per channel, e.g. "
            "--mean 0.485 0.456 0.406 (or 0.485,0.456,0.406).",
            "group": _MODEL,
        },
    )
    std: tuple[float, ...] | None = field(
        default=None, metadata={"help": "Normalization std the model expects, like --mean.", "group": _MODEL}
    )
    weights: Path | None = field(
        default=None,
        metadata={
            "help": "Weights for a factory MODEL: a state_dict of the module the factory returns, as "
            "a .pt file (loaded with weights_only=True, never unpickled) or a .safetensors file.",
            "group": _MODEL,
        },
    )
    surrogate_arch: str = field(
        default="auto",
        metadata={
            "help": "auto (a copy of a torch base, else edge), base, edge, edge-resnet, cnn, cnn-small or "
            "package.module:function.",
            "group": _MODEL,
        },
    )
    budget_minutes: float | None = field(
        default=None,
        metadata={
            "help": "Size the build to about this many minutes on this machine: the surrogate's "
            "fresh-target steps and the draws per calibration and test input (N_cal = n) are scaled "
            "together from the measured speed of your model, between a floor and the full profile's "
            "sizes. Chosen once, when the folder is made.",
            "group": _RUN,
        },
    )
    no_progress: bool = field(default=False, metadata={"help": "Hide progress bars.", "group": _RUN})
    force: bool = field(
        default=False,
        metadata={
            "help": "Go on although the model's top-1 accuracy on a sample of DATA is near chance "
            "(usually a class order other than the sorted folder names, or other preprocessing).",
            "group": _RUN,
        },
    )

    def __post_init__(self) -> None:
        """Normalize plain Python values to the fields' types and check each, naming the flag."""
        values = {
            "model": _text(self.model),
            "data": _text(self.data),
            "workdir": _path(self.workdir),
            "train_data": _text(self.train_data),
            "data_dir": _path(self.data_dir),
            "weights": _path(self.weights),
            "profile": _enum(self.profile, ProfileName, "--profile"),
            "output_kind": _enum(self.output_kind, OutputKind, "--output-kind"),
            "channels": _enum(self.channels, Channels, "--channels"),
            "input_size": _size(self.input_size),
            "mean": _floats(self.mean, "--mean"),
            "std": _floats(self.std, "--std"),
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)
        sigma = self.sigma
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 < sigma <= 1:
            raise ValueError(f"--sigma must be in (0, 1] ([0,1]-pixel units), got {sigma}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"--seed must be an integer >= 0, got {self.seed!r}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("--mean and --std go together: pass both or neither")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"--std must be positive, got {list(self.std)}")
        if not self.surrogate_arch:
            raise ValueError("--surrogate-arch must name an architecture, got ''")
        budget = self.budget_minutes
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, int | float) or not 0 < budget < math.inf
        ):
            raise ValueError(f"--budget-minutes must be a positive number of minutes, got {budget!r}")
