"""RRISE: certified-robust image classification with one forward pass.

Import cost is kept small: ``import rrise`` loads nothing but the version; each public name
(``rrise.Bundle``, ``rrise.certify_from_probs``, …) imports its module (numpy and msgpack only) the
first time it is used, so the console entry can take over Ctrl-C before anything heavy loads.
Torch lives in ``rrise.calibrate`` and ``rrise.export``; the edge runtime is ``rrise.runtime``.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from .bundle import Bundle, BundleError
    from .calibration import Calibration, CalibrationSpec, conformalize
    from .certificate import Certificate, CertificateBatch, certify_from_probs
    from .records import RECORD_KEYS, RECORD_VERSION, RecordError
    from .subscriber import subscribe

# public name → the module that defines it (pyzmq, for ``subscribe``, is a runtime extra)
_LAZY = {
    "Bundle": ".bundle",
    "BundleError": ".bundle",
    "Calibration": ".calibration",
    "CalibrationSpec": ".calibration",
    "conformalize": ".calibration",
    "Certificate": ".certificate",
    "CertificateBatch": ".certificate",
    "certify_from_probs": ".certificate",
    "RECORD_KEYS": ".records",
    "RECORD_VERSION": ".records",
    "RecordError": ".records",
    "subscribe": ".subscriber",
}

__all__ = [
    "__version__",
    "Bundle",
    "BundleError",
    "Calibration",
    "CalibrationSpec",
    "Certificate",
    "CertificateBatch",
    "certify_from_probs",
    "conformalize",
    "RECORD_KEYS",
    "RECORD_VERSION",
    "RecordError",
    "subscribe",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rrise' has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
