"""What a work folder is made from: its base model (:class:`ModelSpec`) and its images
(:class:`DataSpec`), typed and frozen.

A built-in network trained on the folder's data (:class:`NetworkSpec`) and the user's classifier
(:class:`UserModelSpec`: ONNX, ``.pt2``, a factory or an ``nn.Module``) are both a ``ModelSpec``; a
built-in dataset (:class:`BuiltinData`) and the user's images (:class:`ImageData`) are both a
``DataSpec``. :mod:`rrise.calibrate.bases` and :mod:`rrise.calibrate.folder_data` turn a spec into
the folder's base model and data.

``run.json`` records a `rrise build` folder's two specs as one ``user`` object (the layout every
version has written): :func:`read_user_record` reads it, :func:`user_record` writes it.
Standard library only.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = [
    "CHANNELS",
    "OUTPUT_KINDS",
    "USER_DATASET",
    "BuiltinData",
    "DataSpec",
    "ImageData",
    "ModelSpec",
    "NetworkSpec",
    "UserModelSpec",
    "read_user_record",
    "user_record",
]

# Channel orders a model may expect, with their channel counts.
CHANNELS = {"rgb": 3, "bgr": 3, "gray": 1}
# What a model's output holds.
OUTPUT_KINDS = ("logits", "probs")
# The dataset name of a `rrise build` folder (its images are the user's).
USER_DATASET = "user"


@dataclass(frozen=True, kw_only=True)
class ModelSpec(abc.ABC):
    """A work folder's base model, and the surrogate architecture fitted to it by default."""

    surrogate_arch: str
    # Whether ``base.pt`` holds a torch network (else ``base.onnx`` is the base's only runnable form).
    torch_checkpoint: ClassVar[bool] = True

    @abc.abstractmethod
    def describe(self, prof: Any) -> dict[str, Any]:
        """The report's lines on the base model (``prof``: the folder's profile)."""


@dataclass(frozen=True, kw_only=True)
class NetworkSpec(ModelSpec):
    """A built-in network (:data:`rrise.calibrate.models.ARCHS`), trained by ``train-base``."""

    arch: str

    def describe(self, prof: Any) -> dict[str, Any]:
        return {"base model": self.arch, "base training inputs": prof.base_train_size}


@dataclass(frozen=True, kw_only=True)
class UserModelSpec(ModelSpec):
    """The user's classifier (``rrise build --model``) and how to load it; the folder imports it
    as its base instead of training one.

    ``source``: a ``.onnx``/``.pt2`` path or ``package.module:attribute``; None for an ``nn.Module``
    passed in Python (a stage that needs it again asks for it). The other fields are
    :func:`~rrise.calibrate.user_model.load_user_model`'s options.
    """

    torch_checkpoint: ClassVar[bool] = False

    source: str | None
    input_shape: tuple[int, int, int]
    weights: str | None = None
    output: str | None = None
    output_kind: str | None = None
    input_size: tuple[int, int] | None = None
    channels: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def load_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~rrise.calibrate.user_model.load_user_model`."""
        return {
            "weights": self.weights,
            "output": self.output,
            "output_kind": self.output_kind,
            "input_size": self.input_size,
            "channels": self.channels,
            "mean": self.mean,
            "std": self.std,
        }

    def describe(self, prof: Any) -> dict[str, Any]:
        return {"base model": f"the user's ({self.source or 'nn.Module'})"}


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    """A work folder's images."""


@dataclass(frozen=True, kw_only=True)
class BuiltinData(DataSpec):
    """A built-in dataset (:func:`rrise.datasets.load_dataset`) with its train and test splits."""

    name: str
    data_dir: str | None = None


@dataclass(frozen=True, kw_only=True)
class ImageData(DataSpec):
    """The user's images (``rrise build --data``, ``--train-data``), made into model inputs by
    ``preprocess`` (the manifest's) at ``input_shape``; ``sha256``/``name`` identify DATA as it was
    when the folder was made (None before it is loaded)."""

    data: str
    preprocess: Mapping[str, Any] = field(hash=False)
    input_shape: tuple[int, int, int]
    train_data: str | None = None
    data_dir: str | None = None
    sha256: str | None = None
    name: str | None = None


def _floats(value: Any) -> tuple[float, ...] | None:
    if value is None:
        return None
    return tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value]))


def _one_or_list(values: tuple[float, ...] | None) -> float | list[float] | None:
    if values is None:
        return None
    return values[0] if len(values) == 1 else list(values)


def _size(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    items = [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    return (items[0], items[0]) if len(items) == 1 else (items[0], items[1])


def read_user_record(user: Mapping[str, Any]) -> tuple[UserModelSpec, ImageData]:
    """The model and data specs of a `rrise build` folder from its run.json ``user`` record."""
    opts = user.get("model_options") or {}
    shape = tuple(int(v) for v in user["input_shape"])
    model = UserModelSpec(
        source=user.get("model"),
        input_shape=shape,
        weights=opts.get("weights"),
        output=opts.get("output"),
        output_kind=opts.get("output_kind"),
        input_size=_size(opts.get("input_size")),
        channels=opts.get("channels"),
        mean=_floats(opts.get("mean")),
        std=_floats(opts.get("std")),
        surrogate_arch=str(user.get("surrogate_arch", "auto")),
    )
    data = ImageData(
        data=user["data"],
        preprocess=dict(user["preprocess"]),
        input_shape=shape,
        train_data=user.get("train_data"),
        data_dir=user.get("data_dir"),
        sha256=user.get("data_sha256"),
        name=user.get("data_name"),
    )
    return model, data


def user_record(model: UserModelSpec, data: ImageData) -> dict[str, Any]:
    """The run.json ``user`` record of a `rrise build` folder (read back by :func:`read_user_record`)."""
    return {
        "model": model.source,
        "model_options": {
            "weights": model.weights,
            "output": model.output,
            "output_kind": model.output_kind,
            "input_size": None if model.input_size is None else list(model.input_size),
            "channels": model.channels,
            "mean": _one_or_list(model.mean),
            "std": _one_or_list(model.std),
        },
        "data": data.data,
        "train_data": data.train_data,
        "data_dir": data.data_dir,
        "preprocess": dict(data.preprocess),
        "input_shape": list(data.input_shape),
        "surrogate_arch": model.surrogate_arch,
        "data_sha256": data.sha256,
        "data_name": data.name,
    }
