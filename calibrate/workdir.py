"""The work folder: what it was made with (``run.json``: :class:`RunConfig`, with its model and data
specs), its data and splits (:mod:`rrise.calibrate.folder_data`), seeds and file paths.

Data splits (fixed by the seed, disjoint by construction): the base model trains on ``base``; the
surrogate's Monte Carlo targets come from the first ``n_targets`` of ``base``; ``selection`` (model
and rule selection only) and ``calibration`` are held out of both; the test inputs come from the
test split.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rrise.datasets import Dataset
from rrise.fileio import atomic_write_json, read_json

from .folder_data import FolderData, open_data
from .profiles import Profile, get_profile, overridden
from .specs import (
    BuiltinData,
    DataSpec,
    ImageData,
    ModelSpec,
    NetworkSpec,
    UserModelSpec,
    read_user_record,
    user_record,
)

__all__ = ["SEED_STREAMS", "RunConfig", "Workdir", "recorded_config"]

# One seed per random stream of a work folder: 1000 × seed + stream.
SEED_STREAMS = {
    "targets": 1,
    "selection": 2,
    "calibration": 3,
    "cohen": 4,
    "rules": 5,
    "reference": 6,
    "cap": 7,
    "rules-cap": 8,
}
_CONFIG_KEYS = ("dataset", "profile", "sigma", "seed")


@dataclass(frozen=True)
class RunConfig:
    """What a work folder was made with; a resumed stage refuses a folder made otherwise.

    ``model``/``data``: the folder's base model and images (:mod:`rrise.calibrate.specs`); left
    None, the profile's built-in network and the built-in dataset ``dataset`` (see
    :attr:`model_spec`, :attr:`data_spec`). ``user``: the run.json record of a `rrise build` folder
    (``recorded_config(root)["user"]``), read into ``model`` and ``data``. ``profile_overrides``:
    profile fields set otherwise than ``profile`` has them (``{"n_targets": 7}``), recorded in
    run.json when there are any.
    """

    dataset: str = "fashion-mnist"
    profile: str = "quick"
    sigma: float = 0.25
    seed: int = 0
    data_dir: str | None = None
    user: InitVar[Mapping[str, Any] | None] = None
    model: ModelSpec | None = None
    data: DataSpec | None = None
    profile_overrides: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self, user: Mapping[str, Any] | None) -> None:
        """Every value checked before anything is written: a bad one raises ValueError naming it."""
        if user is not None:
            if self.model is not None or self.data is not None:
                raise TypeError("RunConfig takes a run.json user record or model/data specs, not both")
            model, data = read_user_record(user)
            object.__setattr__(self, "model", model)
            object.__setattr__(self, "data", data)
        sigma = self.sigma
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma):
            raise ValueError(f"sigma must be a finite number > 0 ([0,1]-pixel units), got {sigma!r}")
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0 ([0,1]-pixel units), got {sigma!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ValueError(f"dataset must be a name, got {self.dataset!r}")
        object.__setattr__(self, "profile_overrides", dict(self.profile_overrides or {}))
        self.prof  # noqa: B018 - an unknown profile or profile field raises here, naming it

    @property
    def prof(self) -> Profile:
        return overridden(get_profile(self.profile, self.dataset), self.profile_overrides)

    @property
    def model_spec(self) -> ModelSpec:
        """The base model: ``model``, else the profile's built-in network."""
        p = self.prof
        return self.model or NetworkSpec(arch=p.base_arch, surrogate_arch=p.surrogate_arch)

    @property
    def data_spec(self) -> DataSpec:
        """The images: ``data``, else the built-in dataset ``dataset``."""
        return self.data or BuiltinData(name=self.dataset, data_dir=self.data_dir)

    def record(self) -> dict[str, Any]:
        """The ``config`` object of run.json (a `rrise build` folder's specs as its ``user`` record)."""
        out: dict[str, Any] = {k: getattr(self, k) for k in _CONFIG_KEYS}
        if self.profile_overrides:  # JSON's form (lists), so that run.json reads back equal
            out["profile_overrides"] = {
                k: list(v) if isinstance(v, tuple) else v for k, v in sorted(self.profile_overrides.items())
            }
        if isinstance(self.model, UserModelSpec) and isinstance(self.data, ImageData):
            out["user"] = user_record(self.model, self.data)
        return out


def _differences(have: dict[str, Any], config: RunConfig) -> list[str]:
    """How the configuration recorded in run.json (``have``) differs from ``config``; the user
    record is compared as specs, so that a record an older version wrote matches its reading."""
    wanted = {"profile_overrides": None, **config.record()}  # overrides on one side only differ too
    diff = [
        f"{k}: folder has {have.get(k)!r}, asked for {v!r}"
        for k, v in wanted.items()
        if k != "user" and have.get(k) != v
    ]
    if "user" in wanted:
        recorded = read_user_record(have["user"]) if have.get("user") else None
        if recorded != (config.model, config.data):
            diff.append(f"user: folder has {have.get('user')!r}, asked for {wanted['user']!r}")
    return diff


def recorded_config(root: str | os.PathLike) -> dict[str, Any]:
    """The configuration ``root/run.json`` records (``{}`` for a new folder); ValueError naming the
    file when it is not what this version writes (a truncated or hand-edited file)."""
    meta = Path(root) / "run.json"
    try:
        data = read_json(meta)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(
            f"{meta} cannot be read ({exc}); it records what the folder was made with: "
            "restore it, or use another --workdir"
        ) from None
    if data is None:
        return {}
    config = data.get("config") if isinstance(data, dict) else None
    if not isinstance(config, dict):
        raise ValueError(f"{meta} has no 'config' object; restore it, or use another --workdir")
    return config


@dataclass
class Workdir:
    root: Path
    config: RunConfig
    show_progress: bool = True
    log: Callable[[str], None] = print
    # the folder's images and splits, loaded on first use (or given by whoever loaded them)
    loaded_data: FolderData | None = None
    user_model: Any = None  # the loaded UserModel of a `rrise build` folder, when someone loaded it

    @classmethod
    def open(cls, root: str | os.PathLike, config: RunConfig, **kw: Any) -> Workdir:
        """Create or reopen ``root``; refuse to mix a folder's outputs with another configuration."""
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise ValueError(f"work folder {root} is a file; give a folder")
        meta = root / "run.json"
        have = recorded_config(root) or None  # RunConfig validated every value before this
        if have is None:
            root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(meta, {"config": config.record(), "stage_seconds": {}})
        else:
            diff = _differences(have, config)
            if diff:
                raise ValueError(
                    f"{root} was made with another configuration ({'; '.join(diff)}); use another --workdir"
                )
        return cls(root=root, config=config, **kw)

    # --- paths ----------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def prof(self) -> Profile:
        return self.config.prof

    # --- data -----------------------------------------------------------------------------
    def folder_data(self) -> FolderData:
        """The folder's images and their splits (:func:`rrise.calibrate.folder_data.open_data`)."""
        if self.loaded_data is None:
            self.loaded_data = open_data(self.config.data_spec, self.prof, self.config.seed, self.root)
        return self.loaded_data

    def data(self, split: str) -> Dataset:
        """The dataset that ``split`` (a data split: ``train`` or ``test``) indexes into."""
        return self.folder_data().dataset(split)

    def splits(self) -> dict[str, np.ndarray]:
        """Indices of each split (``base``, ``targets``, ``selection``, ``rules``, ``calibration``,
        ``test``) into its dataset."""
        return self.folder_data().splits()

    def seed(self, stream: str) -> int:
        return 1000 * self.config.seed + SEED_STREAMS[stream]

    # --- bookkeeping ----------------------------------------------------------------------
    def record_seconds(self, stage: str, seconds: float) -> None:
        meta = read_json(self.path("run.json")) or {}
        meta.setdefault("stage_seconds", {})[stage] = round(seconds, 2)
        atomic_write_json(self.path("run.json"), meta)

    def stage_seconds(self) -> dict[str, float]:
        return (read_json(self.path("run.json")) or {}).get("stage_seconds", {})
