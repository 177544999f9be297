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
from typing import Annotated, Any, Literal, NamedTuple

import msgspec
from msgspec import UNSET, UnsetType

from .certificate import Certificate

__all__ = [
    "ADAPTIVE_KEYS",
    "CERTIFIED_BY",
    "DEFAULT_TOPIC",
    "DELIVERY_KEYS",
    "RECORD_KEYS",
    "RECORD_VERSION",
    "STATUS_ADAPTIVE_KEYS",
    "STATUS_KEYS",
    "STATUS_SUFFIX",
    "STATUS_TOPIC",
    "Record",
    "RecordError",
    "Status",
    "Verdict",
    "pack",
    "status_topic",
    "unpack",
    "unpack_status",
]

RECORD_VERSION = 1
DEFAULT_TOPIC = b"rrise"

_NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
_Probability = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
_NonNegFloat = Annotated[float, msgspec.Meta(ge=0.0)]
# Who certified a frame in adaptive mode (``rrise run --mc-budget N``): the surrogate's calibrated
# pass or the base model's Monte Carlo draws; nil when the record abstains.
CERTIFIED_BY = ("surrogate", "mc")
_CertifiedBy = Literal[CERTIFIED_BY]


class RecordError(ValueError):
    """A message that is not a valid record of a version this reader knows.

    Parameters
    ----------
    message:
        What is wrong with it, naming the key.

    >>> try:
    ...     unpack(b"not msgpack at all")
    ... except RecordError as exc:
    ...     print(type(exc).__name__)
    RecordError
    """


class Verdict(NamedTuple):
    """What certification said about one frame, before the stream stamps it into a :class:`Record`:
    its ``seq`` and ``frame`` index, the :class:`~rrise.certificate.Certificate` (None when the
    frame has none, and then ``error`` says why), the class ``label``, the monitor's ``alarm`` word
    and the out-of-distribution p-value ``ood_p``; in adaptive mode also who certified it
    (``certified_by``) and the base-model draws spent on it (``mc_draws``), unset otherwise."""

    seq: int
    frame: int
    certificate: Certificate | None
    label: str | None
    error: str | None
    alarm: str | None
    ood_p: float | None
    certified_by: str | None | UnsetType = UNSET  # adaptive mode only (ADAPTIVE_KEYS)
    mc_draws: int | UnsetType = UNSET


class Record(msgspec.Struct, frozen=True, kw_only=True):
    """The frame record, version 1: the one declaration of its keys (:data:`RECORD_KEYS`, in wire
    order), their types and ranges, and how they hang together. Decoded payloads are checked
    against it (unknown keys are allowed and ignored here); :meth:`of` builds one.

    >>> from rrise.certificate import Certificate
    >>> cert = Certificate(top_class=3, abstain=False, radius=0.5, score=0.9, p_lower=0.8)
    >>> verdict = Verdict(seq=0, frame=0, certificate=cert, label="cat", error=None, alarm=None, ood_p=None)
    >>> record = Record.of(verdict, stamp_ns=1, latency_ms=2.0, source="camera:0", bundle="b" * 16)
    >>> record.label, record.radius, unpack(pack(record.to_dict()))["pred"]
    ('cat', 0.5, 3)
    """

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
    # Adaptive mode (ADAPTIVE_KEYS): absent from the wire when it is off, always present when on.
    certified_by: _CertifiedBy | None | UnsetType = UNSET
    mc_draws: _NonNegInt | UnsetType = UNSET

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
        if (self.certified_by is UNSET) != (self.mc_draws is UNSET):
            raise ValueError("certified_by and mc_draws come together (adaptive mode) or not at all")
        if self.certified_by is not UNSET and (self.certified_by is None) != self.abstain:
            raise ValueError("certified_by is nil exactly when the record abstains")

    @classmethod
    def of(cls, verdict: Verdict, *, stamp_ns: int, latency_ms: float, source: str, bundle: str) -> Record:
        """The record of ``verdict``, stamped: ``stamp_ns`` (capture time, Unix ns), ``latency_ms``
        (capture → hand-out), the ``source`` and ``bundle`` it came from. A verdict without a
        certificate needs an ``error`` (ValueError otherwise)."""
        cert = verdict.certificate
        if cert is None and verdict.error is None:
            raise ValueError("a record needs a certificate or an error")
        return cls(
            v=RECORD_VERSION,
            seq=int(verdict.seq),
            frame=int(verdict.frame),
            stamp_ns=int(stamp_ns),
            source=str(source),
            pred=None if cert is None else cert.pred,
            label=None if cert is None or cert.pred is None else verdict.label,
            abstain=True if cert is None else bool(cert.abstain),
            radius=0.0 if cert is None else float(cert.radius),
            score=None if cert is None else float(cert.score),
            p_lower=None if cert is None else float(cert.p_lower),
            latency_ms=float(latency_ms),
            bundle=bundle,
            error=verdict.error,
            alarm=verdict.alarm,
            ood_p=None if verdict.ood_p is None else float(verdict.ood_p),
            certified_by=verdict.certified_by,
            mc_draws=verdict.mc_draws if verdict.mc_draws is UNSET else int(verdict.mc_draws),
        )

    def to_dict(self) -> dict[str, Any]:
        """The record as the plain dict sinks, callbacks and subscribers get (keys in wire order;
        the adaptive keys only when they are set)."""
        return {k: v for k, v in msgspec.structs.asdict(self).items() if v is not UNSET}


# The keys adaptive certification adds (``rrise run --mc-budget N``, N > 0): on every record of
# such a run, on none of a one-pass run (whose records are byte for byte those of earlier runtimes).
ADAPTIVE_KEYS = ("certified_by", "mc_draws")
# The keys of every frame record (a one-pass run's records have exactly these, in this order).
RECORD_KEYS = tuple(k for k in Record.__struct_fields__ if k not in ADAPTIVE_KEYS)


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


# --- status records ---------------------------------------------------------------------------
# A running stream also publishes a periodic health record on its own topic, ``<topic>.status``
# (b"rrise.status" by default). Status records are told apart by ``kind == "status"`` and are never
# mixed into a frame-record stream by the subscriber unless it asks for them.
STATUS_SUFFIX = b".status"
STATUS_TOPIC = DEFAULT_TOPIC + STATUS_SUFFIX
# What the publisher knows about its subscribers (see rrise.runtime.sinks.ZmqPublisher); nil when
# the stream has no publisher. Optional on read, so status records of earlier v1 runtimes validate.
DELIVERY_KEYS = ("subscribers", "subscribers_peak", "published", "published_unheard")


class Status(msgspec.Struct, frozen=True, kw_only=True):
    """The status record, version 1: the one declaration of its keys (wire order), types and
    ranges; unknown keys are allowed on read. ``frames``, ``drops``, ``errors``, ``reconnects``,
    ``ood_flags`` count since the start; ``fps``, ``abstain_rate`` (among frames without an error),
    ``ood_flag_rate`` and the latency percentiles cover the interval since the previous status
    record; ``monitor`` is the shift monitor's state. Keys with a default were added within v1
    (a reader of older records finds them nil).

    >>> status = Status(stamp_ns=1, source="s", bundle="b", uptime_s=1.0, frames=10, fps=10.0,
    ...                 drops=0, errors=0, abstain_rate=0.1, latency_p50_ms=1.0, latency_p99_ms=2.0,
    ...                 alarm=None, source_state="open", reconnects=0, publish_failed=0)
    >>> unpack_status(pack(status.to_dict()))["frames"]
    10
    """

    v: int = RECORD_VERSION
    kind: str = "status"
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
    ood_flags: _NonNegInt | None = None
    ood_flag_rate: _Probability | None = None
    monitor: dict[str, Any] | None = None
    subscribers: _NonNegInt | None = None
    subscribers_peak: _NonNegInt | None = None
    published: _NonNegInt | None = None
    published_unheard: _NonNegInt | None = None
    # Adaptive mode only (STATUS_ADAPTIVE_KEYS; absent otherwise): since the start, the frames given
    # base-model draws, those Monte Carlo certified, the draws (total, mean and p95 per frame given
    # draws); over the interval, latency percentiles per path ({"surrogate"|"mc": {"p50", "p95", "p99"}}).
    mc_frames: _NonNegInt | UnsetType = UNSET
    mc_certified: _NonNegInt | UnsetType = UNSET
    mc_draws: _NonNegInt | UnsetType = UNSET
    mc_draws_mean: _NonNegFloat | None | UnsetType = UNSET
    mc_draws_p95: _NonNegFloat | None | UnsetType = UNSET
    latency_by_path: dict[str, dict[str, float | None]] | UnsetType = UNSET

    def to_dict(self) -> dict[str, Any]:
        """The status record as a plain dict (keys in wire order; the adaptive keys only when set)."""
        return {k: v for k, v in msgspec.structs.asdict(self).items() if v is not UNSET}


# What status records and run summaries add in adaptive mode (``--mc-budget N``, N > 0).
STATUS_ADAPTIVE_KEYS = (
    "mc_frames",
    "mc_certified",
    "mc_draws",
    "mc_draws_mean",
    "mc_draws_p95",
    "latency_by_path",
)


# The keys every v1 status record has (those added later within v1 are optional on read).
STATUS_KEYS = ("v", "kind", *(f.name for f in msgspec.structs.fields(Status) if f.required))


def status_topic(topic: bytes | str = DEFAULT_TOPIC) -> bytes:
    """The status topic that goes with a frame-record topic: ``topic + b".status"``."""
    t = topic.encode() if isinstance(topic, str) else bytes(topic)
    return t + STATUS_SUFFIX


def unpack_status(payload: bytes) -> dict[str, Any]:
    """Decode and validate one status payload against :class:`Status`; raise RecordError if it is
    not a v1 status record with every value of the right type."""
    status = _decode_map(payload, "status record")
    if status.get("kind") != "status":
        raise RecordError(f"status record kind is {status.get('kind')!r}, not 'status'")
    _validate(status, Status, "status record")
    return status
