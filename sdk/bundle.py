"""The deployable bundle: a folder holding ``manifest.json`` and every file it lists with its sha256.

``Bundle.load`` refuses anything it cannot vouch for — a changed, missing or extra file, a malformed
manifest, an unknown schema version — with a :class:`BundleError` that names the problem.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .calibration import Calibration
from .fileio import atomic_path
from .numerics import MICRO_BATCH_LIMIT

__all__ = ["SCHEMA_VERSION", "Bundle", "BundleError", "sha256_file", "write_manifest"]

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED_KEYS = (
    "schema_version",
    "rrise_version",
    "created",
    "model",
    "preprocess",
    "smoothing",
    "calibration",
    "base_model",
    "variants",
    "guarantee",
    "files",
)
GUARANTEE = (
    "If the calibration inputs and the deployed input are exchangeable (drawn from the same "
    "distribution), then with probability at least 1 - alpha - beta over calibration, input and "
    "noise, either the record abstains or the smoothed classifier predicts the record's class and "
    "is constant on the l2 ball of the record's radius (in [0,1]-pixel units of the model input). "
    "It is a marginal guarantee over the input distribution, not a per-input one, and it does not "
    "survive distribution shift or a changed base model."
)


class BundleError(Exception):
    """A bundle that cannot be trusted or used; the message names the file or key at fault."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """Hash every file in ``folder`` into ``manifest['files']`` and write the manifest atomically.

    The caller's dict is not modified. The manifest gets the usual file permissions (``0o666`` less
    the umask), so a bundle made by one user can be read by the service that runs it.
    """
    folder = Path(folder)
    files = {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".tmp")
    }
    manifest = copy.deepcopy(dict(manifest))
    manifest["files"] = files
    for entry in [manifest.get("model"), manifest.get("base_model"), *manifest.get("variants", [])]:
        if isinstance(entry, dict) and entry.get("file") in files:
            entry["sha256"] = files[entry["file"]]
    with atomic_path(folder / MANIFEST) as tmp, open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=False, allow_nan=False)
        f.write("\n")
    return folder / MANIFEST


def _unsafe_name(name: object) -> bool:
    """A manifest file name that is not a plain relative path inside the bundle folder."""
    if not isinstance(name, str) or not name or "\\" in name:
        return True
    parts = name.split("/")
    return name.startswith("/") or any(p in ("", ".", "..") for p in parts) or ":" in parts[0]


CALIBRATED_WITH = ("onnxruntime-cpu", "onnxruntime-cuda", "tensorrt")


def _quantile_problems(i: int, v: dict[str, Any]) -> list[str]:
    """A variant's quantile is a finite number, or null for a variant that says why it
    ``needs_recalibration`` (it could not be run where it was made). A calibrated variant says
    which numerics its quantile holds for: ``calibrated_with`` and ``max_batch``."""
    if "quantile" not in v:
        return []
    q = v["quantile"]
    if q is None:
        if not v.get("needs_recalibration"):
            return [f"variants[{i}].quantile is null but the variant does not say why (needs_recalibration)"]
        return []
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not math.isfinite(q):
        return [f"variants[{i}].quantile must be a finite number, got {q!r}"]
    problems = []
    cw = v.get("calibrated_with")
    if cw not in CALIBRATED_WITH:
        problems.append(
            f"variants[{i}].calibrated_with must be one of {', '.join(CALIBRATED_WITH)} (the numerics its "
            f"quantile holds for), got {cw!r}: re-export the bundle"
        )
    elif (cw == "tensorrt") != (v.get("backend") == "tensorrt"):
        problems.append(f"variants[{i}] runs on {v.get('backend')!r} but was calibrated with {cw!r}")
    mb = v.get("max_batch")
    if isinstance(mb, bool) or not isinstance(mb, int) or not 1 <= mb <= MICRO_BATCH_LIMIT:
        problems.append(
            f"variants[{i}].max_batch must be an integer in [1, {MICRO_BATCH_LIMIT}] (the batch sizes its "
            f"quantile was checked at), got {mb!r}: re-export the bundle"
        )
    return problems


@dataclass
class Bundle:
    """A verified bundle. Load with :meth:`Bundle.load`."""

    path: Path
    manifest: dict[str, Any]
    id: str

    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True) -> Bundle:
        """Read ``path/manifest.json`` and check every file's sha256; raise BundleError if any fails."""
        path = Path(path)
        if not path.is_dir():
            raise BundleError(f"bundle {path} is not a folder")
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise BundleError(f"bundle {path} has no {MANIFEST}")
        raw = mpath.read_bytes()
        try:
            manifest = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{mpath} is not valid JSON: {exc}") from None
        if not isinstance(manifest, dict):
            raise BundleError(f"{mpath} must hold a JSON object")
        bundle = cls(path=path, manifest=manifest, id=hashlib.sha256(raw).hexdigest()[:16])
        schema_problems = bundle._schema_problems()
        if schema_problems:
            raise BundleError(f"{mpath}: " + "; ".join(schema_problems))
        if verify:
            problems = bundle.integrity_problems()
            if problems:
                raise BundleError(f"bundle {path} failed its integrity check: " + "; ".join(problems))
        return bundle

    def _schema_problems(self) -> list[str]:
        m = self.manifest
        missing = [k for k in REQUIRED_KEYS if k not in m]
        if missing:
            return [f"missing key(s) {', '.join(missing)}"]
        if m["schema_version"] != SCHEMA_VERSION:
            return [
                f"unknown schema_version {m['schema_version']!r} (this rrise reads {SCHEMA_VERSION}); "
                "upgrade rrise or re-export the bundle"
            ]
        problems = []
        for key, sub in (
            ("model", ("file", "input", "output", "num_classes")),
            ("calibration", ("score", "alpha", "beta", "n_mc", "quantile", "m")),
            ("smoothing", ("sigma",)),
        ):
            if not isinstance(m[key], dict):
                problems.append(f"'{key}' must be an object")
                continue
            problems += [f"missing key {key}.{s}" for s in sub if s not in m[key]]
        if not problems:
            try:
                Calibration.from_dict(m["calibration"], sigma=m["smoothing"]["sigma"])
            except ValueError as exc:
                problems.append(str(exc))
        if not isinstance(m["base_model"], dict) or "file" not in m["base_model"]:
            problems.append("'base_model' must be an object with a 'file'")
        if not isinstance(m["variants"], list) or not m["variants"]:
            problems.append("'variants' must be a non-empty list")
        else:
            for i, v in enumerate(m["variants"]):
                if not isinstance(v, dict):
                    problems.append(f"variants[{i}] must be an object")
                    continue
                problems += [
                    f"missing key variants[{i}].{s}"
                    for s in ("precision", "backend", "file", "quantile")
                    if s not in v
                ]
                problems += _quantile_problems(i, v)
        if not isinstance(m["files"], dict):
            problems.append("'files' must be an object of file name -> sha256")
        else:
            problems += [
                f"file name {name!r} in 'files' is not a relative path inside the bundle"
                for name in m["files"]
                if _unsafe_name(name)
            ]
        if not problems:
            problems += [
                f"file name {e['file']!r} is not a relative path inside the bundle"
                for e in self._file_entries()
                if _unsafe_name(e.get("file"))
            ]
        return problems

    def integrity_problems(self) -> list[str]:
        """Every changed, missing or extra file, and every entry whose hash disagrees with 'files'."""
        listed: dict[str, str] = self.manifest["files"]
        problems = []
        for name, digest in listed.items():
            p = self.path / name
            if not p.is_file():
                problems.append(f"missing file {name}")
            elif sha256_file(p) != digest:
                problems.append(f"changed file {name} (sha256 differs from the manifest)")
        on_disk = {
            p.relative_to(self.path).as_posix()
            for p in self.path.rglob("*")
            if p.is_file() and p.name != MANIFEST
        }
        problems += [f"extra file {name} (not in the manifest)" for name in sorted(on_disk - set(listed))]
        for entry in self._file_entries():
            f = entry.get("file")
            if f not in listed:
                problems.append(f"manifest names {f!r}, which is not in 'files'")
            elif entry.get("sha256") not in (None, listed[f]):
                problems.append(f"manifest sha256 of {f} disagrees with 'files'")
        return problems

    def _file_entries(self) -> list[dict]:
        m = self.manifest
        return [e for e in [m["model"], m["base_model"], *m["variants"]] if isinstance(e, dict)]

    # --- convenient views -------------------------------------------------------------------
    @property
    def labels(self) -> list[str]:
        labels = self.manifest["model"].get("labels")
        return list(labels) if labels else [str(i) for i in range(self.num_classes)]

    @property
    def num_classes(self) -> int:
        return int(self.manifest["model"]["num_classes"])

    @property
    def sigma(self) -> float:
        return float(self.manifest["smoothing"]["sigma"])

    def file(self, name: str) -> Path:
        return self.path / name

    def variant(self, precision: str = "fp32", backend: str | None = None) -> dict[str, Any]:
        """The variant entry for ``precision`` (and ``backend``, if given)."""
        for v in self.manifest["variants"]:
            if v.get("precision") == precision and backend in (None, v.get("backend")):
                return v
        have = ", ".join(f"{v.get('precision')}/{v.get('backend')}" for v in self.manifest["variants"])
        raise BundleError(f"bundle {self.path} has no {precision}/{backend or 'any'} variant (has {have})")

    def calibration(self, variant: dict[str, Any] | None = None) -> Calibration:
        """The calibration record, with the quantile of ``variant`` when one is given."""
        try:
            cal = Calibration.from_dict(self.manifest["calibration"], sigma=self.sigma)
        except ValueError as exc:
            raise BundleError(f"bundle {self.path}: {exc}") from None
        if variant is not None:
            name = f"{variant.get('precision')}/{variant.get('backend')} ({variant.get('file')})"
            if variant.get("quantile") is None:
                why = variant.get("needs_recalibration") or "not calibrated"
                raise BundleError(f"variant {name} of bundle {self.path} has no quantile: {why}")
            bins = None
            if cal.bin_edges:
                if not isinstance(variant.get("bin_quantiles"), list):
                    raise BundleError(
                        f"variant {name} of bundle {self.path} has no bin_quantiles, but the calibration "
                        "is by confidence bins: recalibrate it with rrise-export"
                    )
                bins = tuple(variant["bin_quantiles"])
            cal = cal.with_quantile(float(variant["quantile"]), bins)
        return cal
