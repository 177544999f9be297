"""The record schema: one msgpack map per frame, sent as ZeroMQ ``[topic, payload]``."""

from __future__ import annotations

from typing import Any

import msgpack

from .certificate import Certificate

__all__ = [
    "DEFAULT_TOPIC",
    "RECORD_KEYS",
    "RECORD_VERSION",
    "STATUS_KEYS",
    "STATUS_SUFFIX",
    "STATUS_TOPIC",
    "RecordError",
    "make_record",
    "make_status",
    "pack",
    "status_topic",
    "unpack",
    "unpack_status",
]

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


# --- status records ---------------------------------------------------------------------------
# A running stream also publishes a periodic health record on its own topic, ``<topic>.status``
# (b"rrise.status" by default). Frame records keep exactly RECORD_KEYS; status records are told
# apart by ``kind == "status"`` and are never mixed into a frame-record stream by the subscriber
# unless it asks for them.
STATUS_SUFFIX = b".status"
STATUS_TOPIC = DEFAULT_TOPIC + STATUS_SUFFIX
STATUS_KEYS = (
    "v",
    "kind",
    "stamp_ns",
    "source",
    "bundle",
    "uptime_s",
    "frames",
    "fps",
    "drops",
    "errors",
    "abstain_rate",
    "latency_p50_ms",
    "latency_p99_ms",
    "alarm",
    "source_state",
    "reconnects",
    "publish_failed",
)


def status_topic(topic: bytes | str = DEFAULT_TOPIC) -> bytes:
    """The status topic that goes with a frame-record topic: ``topic + b".status"``."""
    t = topic.encode() if isinstance(topic, str) else bytes(topic)
    return t + STATUS_SUFFIX


def make_status(
    *,
    stamp_ns: int,
    source: str,
    bundle: str,
    uptime_s: float,
    frames: int,
    fps: float,
    drops: int,
    errors: int,
    abstain_rate: float | None,
    latency_p50_ms: float | None,
    latency_p99_ms: float | None,
    alarm: str | None,
    source_state: str,
    reconnects: int,
    publish_failed: int = 0,
    **extra: Any,
) -> dict[str, Any]:
    """A status record. ``frames``, ``drops``, ``errors``, ``reconnects`` count since the start;
    ``fps``, ``abstain_rate`` (among frames without an error) and the latency percentiles cover the
    interval since the previous status record. ``extra`` keys (e.g. ``monitor``) are appended."""
    status = {
        "v": RECORD_VERSION,
        "kind": "status",
        "stamp_ns": int(stamp_ns),
        "source": str(source),
        "bundle": str(bundle),
        "uptime_s": float(uptime_s),
        "frames": int(frames),
        "fps": float(fps),
        "drops": int(drops),
        "errors": int(errors),
        "abstain_rate": None if abstain_rate is None else float(abstain_rate),
        "latency_p50_ms": None if latency_p50_ms is None else float(latency_p50_ms),
        "latency_p99_ms": None if latency_p99_ms is None else float(latency_p99_ms),
        "alarm": alarm,
        "source_state": str(source_state),
        "reconnects": int(reconnects),
        "publish_failed": int(publish_failed),
    }
    status.update(extra)
    return status


def unpack_status(payload: bytes) -> dict[str, Any]:
    """Decode and validate one status payload; raise RecordError if it is not a v1 status record."""
    try:
        status = msgpack.unpackb(payload, raw=False)
    except Exception as exc:
        raise RecordError(f"payload is not msgpack: {exc}") from None
    if not isinstance(status, dict):
        raise RecordError("payload is not a msgpack map")
    if status.get("v") != RECORD_VERSION:
        raise RecordError(f"status version {status.get('v')!r} is not {RECORD_VERSION}")
    if status.get("kind") != "status":
        raise RecordError(f"status record kind is {status.get('kind')!r}, not 'status'")
    missing = [k for k in STATUS_KEYS if k not in status]
    if missing:
        raise RecordError(f"status record lacks {', '.join(missing)}")
    return status
