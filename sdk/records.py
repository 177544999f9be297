"""The record schema (DESIGN §3): one msgpack map per frame, sent as ZeroMQ ``[topic, payload]``."""

from __future__ import annotations

from typing import Any

import msgpack

from .certificate import Certificate

__all__ = ["RECORD_VERSION", "RECORD_KEYS", "DEFAULT_TOPIC", "RecordError", "make_record", "pack", "unpack"]

RECORD_VERSION = 1
DEFAULT_TOPIC = b"rrise"
RECORD_KEYS = (
    "v",
    "seq",
    "frame",
    "stamp_ns",
    "source",
    "pred",
    "label",
    "abstain",
    "radius",
    "score",
    "p_lower",
    "latency_ms",
    "bundle",
    "error",
    "alarm",
)


class RecordError(ValueError):
    """A message that is not a valid record of a version this reader knows."""


def make_record(
    *,
    seq: int,
    frame: int,
    stamp_ns: int,
    source: str,
    bundle: str,
    certificate: Certificate | None = None,
    labels: list[str] | None = None,
    latency_ms: float = 0.0,
    error: str | None = None,
    alarm: str | None = None,
) -> dict[str, Any]:
    """A record for one frame; with ``certificate=None`` it is an error record (``error`` says why)."""
    if certificate is None and error is None:
        raise ValueError("a record needs a certificate or an error")
    pred = None if certificate is None else certificate.pred
    return {
        "v": RECORD_VERSION,
        "seq": int(seq),
        "frame": int(frame),
        "stamp_ns": int(stamp_ns),
        "source": str(source),
        "pred": pred,
        "label": None if pred is None or labels is None else labels[pred],
        "abstain": True if certificate is None else bool(certificate.abstain),
        "radius": 0.0 if certificate is None else float(certificate.radius),
        "score": None if certificate is None else float(certificate.score),
        "p_lower": None if certificate is None else float(certificate.p_lower),
        "latency_ms": float(latency_ms),
        "bundle": bundle,
        "error": error,
        "alarm": alarm,
    }


def pack(record: dict[str, Any]) -> bytes:
    return msgpack.packb(record, use_bin_type=True)


def unpack(payload: bytes) -> dict[str, Any]:
    """Decode and validate one payload; raise RecordError if it is not a version-1 record."""
    try:
        record = msgpack.unpackb(payload, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise RecordError(f"payload is not msgpack: {exc}") from None
    if not isinstance(record, dict):
        raise RecordError("payload is not a msgpack map")
    if record.get("v") != RECORD_VERSION:
        raise RecordError(f"record version {record.get('v')!r} is not {RECORD_VERSION}")
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
        raise RecordError(f"record lacks {', '.join(missing)}")
    return record
