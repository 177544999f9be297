"""RRISE: certified-robust image classification with one forward pass.

Import cost is kept small: numpy and msgpack only. Torch lives in ``rrise.calibrate`` and
``rrise.export``; the edge runtime is ``rrise.runtime``.
"""

from ._version import __version__
from .bundle import Bundle, BundleError
from .calibration import Calibration, CalibrationSpec, conformalize
from .certificate import Certificate, CertificateBatch, certify_from_probs
from .records import RECORD_KEYS, RECORD_VERSION, RecordError

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


def __getattr__(name: str):
    if name == "subscribe":  # pyzmq is a runtime extra: import it only when asked for
        from .subscriber import subscribe

        return subscribe
    raise AttributeError(f"module 'rrise' has no attribute {name!r}")
