"""The record schema: one msgpack map per frame, sent as ZeroMQ ``[topic, payload]``.

:class:`Record` and :class:`Status` are the typed schemas (msgspec structs) every decoded payload is
checked against: each key of :data:`RECORD_KEYS` present with its type and range (``radius`` a
finite float ≥ 0, ``score`` and ``p_lower`` in [0, 1] or nil, ``seq`` and ``frame`` integers ≥ 0…)
and consistent (an abstaining record has no ``pred`` and radius 0; a record with an ``error`` abstains).
Keys beyond the schema are kept: a newer publisher may add keys, never change the meaning or type of
existing ones. :func:`unpack` returns the record as a plain dict, extra keys included.
"""

from __future__ import annotations

import functools
import math
from typing import Annotated, Any

import msgspec

from .certificate import Certificate

__all__ = [
    "DEFAULT_TOPIC",
    "DELIVERY_KEYS",
    "RECORD_KEYS",
    "RECORD_VERSION",
    "STATUS_KEYS",
    "STATUS_SUFFIX",
    "STATUS_TOPIC",
    "Record",
    "RecordError",
    "Status",
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
    "ood_p",
)

_NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
_Probability = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
_NonNegFloat = Annotated[float, msgspec.Meta(ge=0.0)]


class RecordError(ValueError):
    """A message that is not a valid record of a version this reader knows."""


class Record(msgspec.Struct, frozen=True):
    """The typed schema of a frame record (version 1); unknown keys are allowed and ignored here."""

    v: int
    seq: _NonNegInt
    frame: _NonNegInt
    stamp_ns: int
    source: str
    pred: _NonNegInt | None
    label: str | None
    abstain: bool
    radius: _NonNegFloat
    score: _Probability | None
    p_lower: _Probability | None
    latency_ms: float
    bundle: str
    error: str | None
    alarm: str | None
    ood_p: _Probability | None = None  # per-frame out-of-distribution p-value (rrise.ood)

    def __post_init__(self) -> None:
        if not math.isfinite(self.radius):
            raise ValueError("radius must be finite")
        if not math.isfinite(self.latency_ms):
            raise ValueError("latency_ms must be finite")
        if self.abstain and (self.pred is not None or self.radius != 0.0):
            raise ValueError("an abstaining record has pred nil and radius 0")
        if not self.abstain and (self.pred is None or self.error is not None):
            raise ValueError("a record that does not abstain has a pred and no error")
        if self.pred is None and self.label is not None:
            raise ValueError("a record without pred has label nil")


# --- encoding ---------------------------------------------------------------------------------


def _encode_extra(obj: Any) -> Any:
    """numpy scalars (e.g. a float64 someone put in a record) encode as their Python value."""
    item = getattr(obj, "item", None)
    if item is not None and getattr(obj, "shape", None) == ():
        return item()
    raise TypeError(f"a record value of type {type(obj).__name__} cannot be encoded as msgpack")


_ENCODER = msgspec.msgpack.Encoder(enc_hook=_encode_extra)
_DECODER = msgspec.msgpack.Decoder()


def pack(record: dict[str, Any]) -> bytes:
    """msgpack bytes of a record (or status record)."""
    return _ENCODER.encode(record)


def _decode_map(payload: bytes, what: str) -> dict[str, Any]:
    try:
        obj = _DECODER.decode(payload)
    except msgspec.DecodeError as exc:
        raise RecordError(f"payload is not msgpack: {exc}") from None
    if not isinstance(obj, dict):
        raise RecordError("payload is not a msgpack map")
    if not all(isinstance(k, str) for k in obj):
        raise RecordError(f"{what} has a key that is not a string")
    if obj.get("v") != RECORD_VERSION:
        raise RecordError(f"{what} version {obj.get('v')!r} is not {RECORD_VERSION}")
    return obj


@functools.cache
def _required(schema: type) -> tuple[str, ...]:
    """The keys ``schema`` cannot do without (keys added later to v1 have defaults)."""
    return tuple(f.name for f in msgspec.structs.fields(schema) if f.required)


def _validate(obj: dict[str, Any], schema: type, what: str) -> None:
    missing = [k for k in _required(schema) if k not in obj]
    if missing:
        raise RecordError(f"{what} lacks {', '.join(missing)}")
    try:
        msgspec.convert(obj, schema)
    except msgspec.ValidationError as exc:
        raise RecordError(f"{what} has a bad value: {exc}") from None


def unpack(payload: bytes) -> dict[str, Any]:
    """Decode and validate one payload against :class:`Record`; raise RecordError (saying which key
    and why) if it is not a version-1 frame record with every value of the right type and range."""
    record = _decode_map(payload, "record")
    _validate(record, Record, "record")
    return record


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
    ood_p: float | None = None,
) -> dict[str, Any]:
    """A record for one frame; with ``certificate=None`` it is an error record (``error`` says why).
    ``ood_p``: the frame's out-of-distribution p-value, None without that test."""
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
        "ood_p": None if ood_p is None else float(ood_p),
    }


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
# What the publisher knows about its subscribers (see rrise.runtime.sinks.ZmqPublisher); nil when
# the stream has no publisher. Optional on read, so status records of earlier v1 runtimes validate.
DELIVERY_KEYS = ("subscribers", "subscribers_peak", "published", "published_unheard")


class Status(msgspec.Struct, frozen=True):
    """The typed schema of a status record (version 1); unknown keys are allowed."""

    v: int
    kind: str
    stamp_ns: int
    source: str
    bundle: str
    uptime_s: _NonNegFloat
    frames: _NonNegInt
    fps: _NonNegFloat
    drops: _NonNegInt
    errors: _NonNegInt
    abstain_rate: _Probability | None
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    alarm: str | None
    source_state: str
    reconnects: _NonNegInt
    publish_failed: _NonNegInt
    subscribers: _NonNegInt | None = None
    subscribers_peak: _NonNegInt | None = None
    published: _NonNegInt | None = None
    published_unheard: _NonNegInt | None = None


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
    interval since the previous status record. ``extra`` keys (e.g. ``monitor``, the
    :data:`DELIVERY_KEYS`) are appended."""
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
    """Decode and validate one status payload against :class:`Status`; raise RecordError if it is
    not a v1 status record with every value of the right type."""
    status = _decode_map(payload, "status record")
    if status.get("kind") != "status":
        raise RecordError(f"status record kind is {status.get('kind')!r}, not 'status'")
    _validate(status, Status, "status record")
    return status
