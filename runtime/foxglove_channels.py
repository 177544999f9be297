"""The Foxglove view of a certified stream: channels in one ``foxglove.Context``, shared by the MCAP
recorder and the live WebSocket server (``foxglove-sdk``).

Channels (topic: schema, encoding):

* ``/rrise/image/compressed``: ``foxglove.CompressedImage`` (protobuf), the frame as JPEG;
* ``/rrise/image/annotations``: ``foxglove.ImageAnnotations`` (protobuf), the label and radius
  drawn over that image by Foxglove's Image panel;
* ``/rrise/prediction``: ``rrise.CertifiedPrediction`` (JSON schema, JSON), the record exactly
  (DESIGN §3 keys);
* ``/rrise/status``: ``rrise.Status`` (JSON schema, JSON), the stream's status records.

Every message is logged at the frame's ``stamp_ns`` (its capture time), and carries it inside.

An adaptive run (``--mc-budget N``, N > 0; ``adaptive=True``) declares the keys its records and
status records add (:data:`~rrise.records.ADAPTIVE_KEYS`: ``certified_by``, ``mc_draws``;
:data:`~rrise.records.STATUS_ADAPTIVE_KEYS`) in :data:`ADAPTIVE_PREDICTION_SCHEMA` and
:data:`ADAPTIVE_STATUS_SCHEMA`, and its image label says which certified the frame; a one-pass run
keeps :data:`PREDICTION_SCHEMA` and :data:`STATUS_SCHEMA` and its messages byte for byte.
"""

from __future__ import annotations

from typing import Any

from rrise.records import ADAPTIVE_KEYS, CERTIFIED_BY, RECORD_KEYS, STATUS_ADAPTIVE_KEYS

from .extras import require
from .status_text import record_text

__all__ = [
    "ADAPTIVE_PREDICTION_SCHEMA",
    "ADAPTIVE_STATUS_SCHEMA",
    "ANNOTATIONS_TOPIC",
    "IMAGE_TOPIC",
    "PREDICTION_SCHEMA",
    "PREDICTION_TOPIC",
    "STATUS_SCHEMA",
    "STATUS_TOPIC",
    "FoxgloveChannels",
    "label_text",
]

IMAGE_TOPIC = "/rrise/image/compressed"
ANNOTATIONS_TOPIC = "/rrise/image/annotations"
PREDICTION_TOPIC = "/rrise/prediction"
STATUS_TOPIC = "/rrise/status"

_NUM = {"type": ["number", "null"]}
_STR = {"type": ["string", "null"]}
_RECORD_TYPES: dict[str, dict[str, Any]] = {
    "v": {"type": "integer"},
    "seq": {"type": "integer"},
    "frame": {"type": "integer"},
    "stamp_ns": {"type": "integer", "description": "capture time, Unix ns"},
    "source": {"type": "string"},
    "pred": {"type": ["integer", "null"]},
    "label": _STR,
    "abstain": {"type": "boolean"},
    "radius": {"type": "number", "description": "certified l2 radius, [0,1]-pixel units"},
    "score": _NUM,
    "p_lower": _NUM,
    "latency_ms": {"type": "number"},
    "bundle": {"type": "string"},
    "error": _STR,
    "alarm": _STR,
}
PREDICTION_SCHEMA: dict[str, Any] = {
    "title": "rrise.CertifiedPrediction",
    "description": "One certified prediction of the RRISE runtime for one frame (see rrise inspect "
    "for the bundle's guarantee).",
    "type": "object",
    # every record key; one added to the record schema later is listed with its value's types open
    "properties": {key: _RECORD_TYPES.get(key, {}) for key in RECORD_KEYS},
}
STATUS_SCHEMA: dict[str, Any] = {
    "title": "rrise.Status",
    "description": "The runtime's periodic status record.",
    "type": "object",
    "properties": {
        "stamp_ns": {"type": "integer"},
        "fps": {"type": "number"},
        "frames": {"type": "integer"},
        "drops": {"type": "integer"},
        "errors": {"type": "integer"},
        "abstain_rate": _NUM,
        "latency_p50_ms": _NUM,
        "latency_p99_ms": _NUM,
        "alarm": _STR,
        "source_state": {"type": "string"},
    },
}

_ADAPTIVE_TYPES: dict[str, dict[str, Any]] = {
    "certified_by": {
        "type": ["string", "null"],
        "enum": [*CERTIFIED_BY, None],
        "description": "who certified the frame: the surrogate, Monte Carlo draws (mc), nil when abstaining",
    },
    "mc_draws": {"type": "integer", "minimum": 0, "description": "base-model draws spent on the frame"},
}
_COUNT = {"type": "integer", "minimum": 0}
_STATUS_ADAPTIVE_TYPES: dict[str, dict[str, Any]] = {
    "mc_frames": _COUNT,
    "mc_certified": _COUNT,
    "mc_draws": _COUNT,
    "mc_draws_mean": _NUM,
    "mc_draws_p95": _NUM,
    "latency_by_path": {"type": "object", "description": "latency percentiles (ms) per path"},
}


def _with_keys(
    schema: dict[str, Any], types: dict[str, dict[str, Any]], keys: tuple[str, ...]
) -> dict[str, Any]:
    """``schema`` with ``keys`` added to its properties (an adaptive run's form of it)."""
    return {**schema, "properties": {**schema["properties"], **{k: types.get(k, {}) for k in keys}}}


ADAPTIVE_PREDICTION_SCHEMA = _with_keys(PREDICTION_SCHEMA, _ADAPTIVE_TYPES, ADAPTIVE_KEYS)
ADAPTIVE_STATUS_SCHEMA = _with_keys(STATUS_SCHEMA, _STATUS_ADAPTIVE_TYPES, STATUS_ADAPTIVE_KEYS)

# RGBA colours of the label drawn by Foxglove: certified, abstained, no prediction
_COLOURS = {"certified": (0.2, 0.8, 0.3), "abstain": (1.0, 0.65, 0.0), "error": (0.9, 0.15, 0.15)}


class FoxgloveChannels:
    """The four channels of one stream in ``context`` (a ``foxglove.Context``); ``adaptive``: the
    run's records carry the adaptive keys (see the module docstring)."""

    def __init__(self, context: Any, *, adaptive: bool = False) -> None:
        fg = require("foxglove", "the Foxglove view")
        from foxglove.channels import CompressedImageChannel, ImageAnnotationsChannel

        prediction = ADAPTIVE_PREDICTION_SCHEMA if adaptive else PREDICTION_SCHEMA
        status = ADAPTIVE_STATUS_SCHEMA if adaptive else STATUS_SCHEMA
        self.image = CompressedImageChannel(IMAGE_TOPIC, context=context)
        self.annotations = ImageAnnotationsChannel(ANNOTATIONS_TOPIC, context=context)
        self.prediction = fg.Channel(PREDICTION_TOPIC, schema=prediction, context=context)
        self.status = fg.Channel(STATUS_TOPIC, schema=status, context=context)
        self.messages = 0

    def log(self, record: dict[str, Any], jpeg: bytes | None, width: int) -> None:
        """The frame (when there is one), its annotation and its record, at the record's stamp."""
        from foxglove.messages import CompressedImage, ImageAnnotations, Timestamp

        stamp = int(record["stamp_ns"])
        ts = Timestamp(*divmod(stamp, 1_000_000_000))
        if jpeg is not None:
            image = CompressedImage(timestamp=ts, frame_id="camera", data=jpeg, format="jpeg")
            self.image.log(image, log_time=stamp)
            texts = [_text_annotation(ts, record, width)]
            self.annotations.log(ImageAnnotations(timestamp=ts, texts=texts), log_time=stamp)
            self.messages += 2
        self.prediction.log(record, log_time=stamp)
        self.messages += 1

    def log_status(self, status: dict[str, Any]) -> None:
        self.status.log(status, log_time=int(status["stamp_ns"]))
        self.messages += 1

    def close(self) -> None:
        for channel in (self.image, self.annotations, self.prediction, self.status):
            channel.close()


def _text_annotation(ts: Any, record: dict[str, Any], width: int) -> Any:
    from foxglove.messages import Color, Point2, TextAnnotation

    kind = "error" if record.get("error") else "abstain" if record.get("abstain") else "certified"
    r, g, b = _COLOURS[kind]
    text = label_text(record)
    return TextAnnotation(
        timestamp=ts,
        position=Point2(x=2.0, y=2.0),
        text=text,
        font_size=max(6.0, width / 16),
        text_color=Color(r=r, g=g, b=b, a=1.0),
        background_color=Color(r=0.0, g=0.0, b=0.0, a=0.6),
    )


def label_text(record: dict[str, Any]) -> str:
    """The text drawn over a frame: ``"coat r=0.410"``, with ``" [mc, 2048 draws]"`` when Monte
    Carlo certified it (an adaptive run) and the shift alarm when one is raised.

    >>> label_text({"pred": 3, "label": "coat", "radius": 0.41, "certified_by": "mc", "mc_draws": 2048})
    'coat r=0.410 [mc, 2048 draws]'
    """
    text = record_text(record)
    if record.get("certified_by") == "mc":
        text += f" [mc, {int(record.get('mc_draws') or 0)} draws]"
    return text + (f" ALARM {record['alarm']}" if record.get("alarm") else "")
