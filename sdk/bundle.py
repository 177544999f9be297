"""The deployable bundle: a folder holding ``manifest.json`` and every file it lists with its sha256.

``Bundle.load`` refuses anything it cannot vouch for — a changed, missing or extra file, a manifest
value that is missing, mistyped, out of range or inconsistent (:mod:`rrise.manifest_schema`), an
unknown schema version — with a :class:`BundleError` that names the problem.

Identity: the bundle id is the sha256 of the canonical manifest (:func:`canonical_manifest`). The
manifest lists the sha256 of every file, so the id changes when any byte of the bundle does; a
robot pins the bundle it was given with ``expect_id`` (``rrise run --expect-id``) or trusts only
bundles signed by a key it holds (``trust``, ``rrise run --trust``; :mod:`rrise.signing`), and
:func:`sign_bundle` signs a verified bundle.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .bundle_id import canonical_manifest, is_bundle_id, manifest_id
from .calibration import Calibration
from .fileio import atomic_path, sha256_file
from .manifest_schema import (
    MANIFEST,
    SCHEMA_VERSION,
    SIGNATURE,
    ManifestError,
    required_schema_version,
    validate_manifest,
)
from .signing import SigningError, verify_signature, write_signature

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "ADAPTIVE_GUARANTEE",
    "GUARANTEE",
    "SCHEMA_VERSION",
    "Bundle",
    "BundleError",
    "bundle_guarantee",
    "canonical_manifest",
    "manifest_id",
    "required_schema_version",
    "sha256_file",
    "sign_bundle",
    "write_manifest",
]

GUARANTEE = (
    "If the calibration inputs and the deployed input are exchangeable (drawn from the same "
    "distribution), then with probability at least 1 - alpha - beta over calibration, input and "
    "noise, either the record abstains or the smoothed classifier predicts the record's class and "
    "is constant on the l2 ball of the record's radius (in [0,1]-pixel units of the model input). "
    "It is a marginal guarantee over the input distribution, not a per-input one, and it does not "
    "survive distribution shift or a changed base model."
)

# Adaptive certification (``rrise run --mc-budget N``) composes the surrogate's marginal guarantee
# with the per-input guarantee of the Monte Carlo bound at level A (``--mc-alpha``), union-bounded.
ADAPTIVE_GUARANTEE = (
    "With adaptive certification on (rrise run --mc-budget N), frames whose surrogate radius falls "
    "short get fresh base-model draws and an anytime-valid Monte Carlo lower bound at level A "
    "(--mc-alpha) on the surrogate's class, and the record keeps the larger of the two certificates: "
    "then with probability at least 1 - alpha - beta - A either the record abstains or the smoothed "
    "classifier predicts the record's class and is constant on the l2 ball of the record's radius "
    "(the surrogate's marginal guarantee and the per-input Monte Carlo guarantee, union-bounded)."
)


def bundle_guarantee(adaptive: bool = False) -> str:
    """The guarantee text a bundle states: :data:`GUARANTEE`, followed by
    :data:`ADAPTIVE_GUARANTEE` when the bundle carries an ``adaptive`` entry (its routing rule).

    Parameters
    ----------
    adaptive : bool
        Whether the bundle states adaptive certification's settings (manifest key ``adaptive``).

    Returns
    -------
    str
        The text for the manifest's ``guarantee``.

    Examples
    --------
    >>> bundle_guarantee() == GUARANTEE
    True
    >>> "1 - alpha - beta - A" in bundle_guarantee(adaptive=True)
    True
    """
    return f"{GUARANTEE} {ADAPTIVE_GUARANTEE}" if adaptive else GUARANTEE


class BundleError(Exception):
    """A bundle that cannot be trusted or used; the message names the file or key at fault.

    Parameters
    ----------
    message : str
        One line saying what is wrong and where.

    Examples
    --------
    >>> try:
    ...     Bundle.load("no/such/bundle")
    ... except BundleError as exc:
    ...     print(exc)
    bundle no/such/bundle is not a folder
    """


def write_manifest(folder: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """Hash every file in ``folder`` into ``manifest['files']`` and write the manifest atomically.

    The caller's dict is not modified. ``manifest.sig`` is never listed: a signature is not part of
    what it signs (and a manifest written here no longer matches an older one). The manifest gets
    the usual file permissions (``0o666`` less the umask), so a bundle made by one user can be read
    by the service that runs it.
    """
    folder = Path(folder)
    files = {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
        and p.relative_to(folder).as_posix() not in (MANIFEST, SIGNATURE)
        and not p.name.startswith(".tmp")
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


def _expected_id(expect_id: str) -> str:
    want = str(expect_id).strip().lower()
    if not is_bundle_id(want):
        raise BundleError(
            f"expected bundle id {expect_id!r} is not a bundle id (64 hex digits, as `rrise inspect` shows)"
        )
    return want


def _link_problem(root: Path, name: str) -> str | None:
    """Why bundle file ``name`` is not a plain file inside ``root`` (a symbolic link on its way, or
    a path resolving outside the folder), or None."""
    p = root
    for part in name.split("/"):
        p = p / part
        if p.is_symlink():
            return f"file {name} is a symbolic link (a bundle holds plain files only; refused)"
    if p.exists() and not p.resolve().is_relative_to(root.resolve()):
        return f"file {name} resolves outside the bundle folder (refused)"
    return None


def _files_on_disk(root: Path) -> tuple[set[str], set[str]]:
    """The plain files under ``root`` (less the manifest and its signature) and the symbolic links
    (to files or folders, which are never followed), as bundle names."""
    files, links = set(), set()
    for folder, dirs, names in os.walk(root, followlinks=False):
        for entry in [*dirs, *names]:
            p = Path(folder, entry)
            name = p.relative_to(root).as_posix()
            if p.is_symlink():
                links.add(name)
            elif entry in names and name not in (MANIFEST, SIGNATURE):
                files.add(name)
    return files, links


def _read_manifest(path: Path) -> dict[str, Any]:
    """``path/manifest.json`` parsed and validated, or BundleError naming what is wrong."""
    if not path.is_dir():
        raise BundleError(f"bundle {path} is not a folder")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"bundle {path} has no {MANIFEST}")
    try:
        manifest = json.loads(mpath.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BundleError(f"{mpath} is not valid JSON: {exc}") from None
    try:
        validate_manifest(manifest)
    except ManifestError as exc:
        raise BundleError(f"{mpath}: {exc}") from None
    return manifest


@dataclass
class Bundle:
    """A verified bundle: its folder, its validated manifest and its id. Load with :meth:`Bundle.load`.

    What it vouches for: every file listed in the manifest has its recorded sha256 (unless loaded
    with ``verify=False``), and every manifest value passed :func:`rrise.manifest_schema.validate_manifest`.
    Certificates made with a variant's :meth:`calibration` carry the manifest's ``guarantee``.

    Parameters
    ----------
    path : Path
        The bundle folder.
    manifest : dict
        The parsed ``manifest.json``.
    id : str
        The bundle id: the sha256 of the canonical manifest (:func:`manifest_id`).

    Examples
    --------
    >>> import tempfile
    >>> Bundle.load(tempfile.mkdtemp())  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    rrise.bundle.BundleError: bundle ... has no manifest.json
    """

    path: Path
    manifest: dict[str, Any]
    id: str

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        verify: bool = True,
        *,
        expect_id: str | None = None,
        trust: Ed25519PublicKey | str | os.PathLike | None = None,
        min_release: int | None = None,
    ) -> Bundle:
        """Read ``path/manifest.json``, validate every value and, with ``verify``, check every file.

        Parameters
        ----------
        path : str or os.PathLike
            The bundle folder.
        verify : bool
            Check every file's sha256 against the manifest (``expect_id`` and ``trust`` imply it).
        expect_id : str or None
            Refuse any bundle whose id is not this one (``rrise run --expect-id``).
        trust : Ed25519PublicKey or str or os.PathLike or None
            A public key (or its file): refuse the bundle unless its ``manifest.sig`` is that key's
            valid signature of this manifest (``rrise run --trust``), not expired.
        min_release : int or None
            With ``trust``: refuse a bundle whose signature states a lower release, or none (a
            rollback to an older, validly signed bundle; :mod:`rrise.signing`, "Releases").

        Returns
        -------
        Bundle
            The loaded bundle.

        Raises
        ------
        BundleError
            A missing folder or manifest, invalid JSON, an invalid manifest value (each named), a
            changed, missing or extra file, another id, a signature that does not verify or has
            expired, a release below ``min_release``, or ``min_release`` without ``trust``.

        Examples
        --------
        >>> Bundle.load("no/such/bundle", verify=False)
        Traceback (most recent call last):
        ...
        rrise.bundle.BundleError: bundle no/such/bundle is not a folder
        """
        path = Path(path)
        manifest = _read_manifest(path)
        bundle = cls(path=path, manifest=manifest, id=manifest_id(manifest))
        if verify or expect_id is not None or trust is not None:
            bundle.check_files()
        bundle.require(expect_id=expect_id, trust=trust, min_release=min_release)
        return bundle

    def check_files(self) -> None:
        """Raise BundleError naming every changed, missing or extra file (:meth:`integrity_problems`)."""
        problems = self.integrity_problems()
        if problems:
            raise BundleError(f"bundle {self.path} failed its integrity check: " + "; ".join(problems))

    def require(
        self,
        *,
        expect_id: str | None = None,
        trust: Ed25519PublicKey | str | os.PathLike | None = None,
        min_release: int | None = None,
    ) -> None:
        """Refuse (BundleError) unless this manifest's id is ``expect_id`` and its ``manifest.sig``
        verifies with the ``trust`` key, unexpired and of release ``min_release`` or later; each
        check only when given (``min_release`` needs ``trust``: only a trusted signature states a
        release). The id is recomputed from the manifest, so an edited ``id`` attribute or manifest
        dict does not pass."""
        if min_release is not None and trust is None:
            raise BundleError(
                f"a lowest release ({min_release}) was asked for bundle {self.path} without a trusted "
                "key: a release number is known only from a signature verified with --trust"
            )
        actual = manifest_id(self.manifest)
        if expect_id is not None:
            want = _expected_id(expect_id)
            if actual != want:
                raise BundleError(
                    f"bundle {self.path} has id {actual}, but {want} was expected: it is another or a "
                    "changed bundle; refusing it"
                )
        if trust is not None:
            try:
                verify_signature(self, trust, min_release=min_release)
            except SigningError as exc:
                raise BundleError(str(exc)) from None

    def integrity_problems(self) -> list[str]:
        """Every changed, missing, extra or symbolically linked file, and every entry whose hash
        disagrees with 'files'. A bundle holds plain files only: a symbolic link (to a file or a
        folder, inside the bundle or out of it) is refused by name, since what it points at can
        change without the bundle changing."""
        listed: dict[str, str] = self.manifest["files"]
        problems = []
        for name, digest in listed.items():
            p = self.path / name
            link = _link_problem(self.path, name)
            if link is not None:
                problems.append(link)
            elif not p.is_file():
                problems.append(f"missing file {name}")
            elif sha256_file(p) != digest:
                problems.append(f"changed file {name} (sha256 differs from the manifest)")
        on_disk, links = _files_on_disk(self.path)
        problems += [f"extra file {name} (not in the manifest)" for name in sorted(on_disk - set(listed))]
        problems += [
            f"file {name} is a symbolic link (a bundle holds plain files only; refused)"
            for name in sorted(links - set(listed))
        ]
        for entry in self._file_entries():
            f = entry.get("file")
            if f not in listed:
                problems.append(f"manifest names {f!r}, which is not in 'files'")
            elif entry.get("sha256") not in (None, listed[f]):
                problems.append(f"manifest sha256 of {f} disagrees with 'files'")
        return problems

    def read_verified(self, name: str, sha256: str | None = None) -> bytes:
        """The bytes of bundle file ``name``, read once and checked against its sha256 in 'files'
        (and ``sha256``, an entry's own record, when given) after they were read: open a model from
        these bytes, never from its path again, so the file cannot change between the check and
        its use. A symbolic link, or a file resolving outside the bundle, is refused.

        Raises BundleError naming the file: not listed, linked, unreadable or changed.
        """
        listed = self.manifest["files"].get(name)
        if listed is None or sha256 not in (None, listed):
            raise BundleError(f"bundle {self.path}: {name} has no single sha256 in the manifest")
        link = _link_problem(self.path, name)
        if link is not None:
            raise BundleError(f"bundle {self.path}: {link}")
        try:
            fd = os.open(self.path / name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise BundleError(f"bundle {self.path}: cannot read {name}: {exc.strerror or exc}") from None
        if hashlib.sha256(data).hexdigest() != listed:
            raise BundleError(f"bundle {self.path}: changed file {name} (sha256 differs from the manifest)")
        return data

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


def sign_bundle(
    bundle_dir: str | os.PathLike,
    key: Ed25519PrivateKey | str | os.PathLike,
    *,
    release: int | None = None,
    expires: str | datetime | None = None,
) -> Path:
    """Sign the bundle at ``bundle_dir``, verified first, into its ``manifest.sig``.

    The signature covers the canonical manifest (:func:`canonical_manifest`), which lists the sha256
    of every file, and the ``release`` number and ``expires`` time when given (:mod:`rrise.signing`,
    "Releases"); it replaces any older signature, and neither the manifest nor the id change.

    Parameters
    ----------
    bundle_dir : str or os.PathLike
        The bundle folder.
    key : Ed25519PrivateKey or str or os.PathLike
        The signing key, or its file (PEM, OpenSSH or raw 32 bytes).
    release : int or None
        This bundle's release number: raise it with each bundle published, so a device loading with
        ``min_release`` refuses older ones.
    expires : str or datetime or None
        When the signature stops vouching for the bundle (UTC, ISO 8601, e.g. ``2027-01-31T00:00:00Z``).

    Returns
    -------
    Path
        The path of ``manifest.sig``.

    Raises
    ------
    BundleError
        When the bundle does not verify.
    rrise.signing.SigningError
        When the key cannot be used, or the release or expiry is not one (it is a ValueError).
    """
    bundle = Bundle.load(bundle_dir)
    try:
        return write_signature(bundle.path, bundle.manifest, key, release=release, expires=expires)
    except SigningError:
        raise
    except ValueError as exc:
        raise SigningError(str(exc)) from None
