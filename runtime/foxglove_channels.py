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
"""

from __future__ import annotations

from typing import Any

from rrise.records import RECORD_KEYS

from .extras import require
from .status_text import record_text

__all__ = [
    "ANNOTATIONS_TOPIC",
    "IMAGE_TOPIC",
    "PREDICTION_SCHEMA",
    "PREDICTION_TOPIC",
    "STATUS_SCHEMA",
    "STATUS_TOPIC",
    "FoxgloveChannels",
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

# RGBA colours of the label drawn by Foxglove: certified, abstained, no prediction
_COLOURS = {"certified": (0.2, 0.8, 0.3), "abstain": (1.0, 0.65, 0.0), "error": (0.9, 0.15, 0.15)}


class FoxgloveChannels:
    """The four channels of one stream in ``context`` (a ``foxglove.Context``)."""

    def __init__(self, context: Any) -> None:
        fg = require("foxglove", "the Foxglove view")
        from foxglove.channels import CompressedImageChannel, ImageAnnotationsChannel

        self.image = CompressedImageChannel(IMAGE_TOPIC, context=context)
        self.annotations = ImageAnnotationsChannel(ANNOTATIONS_TOPIC, context=context)
        self.prediction = fg.Channel(PREDICTION_TOPIC, schema=PREDICTION_SCHEMA, context=context)
        self.status = fg.Channel(STATUS_TOPIC, schema=STATUS_SCHEMA, context=context)
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
    text = record_text(record) + (f" ALARM {record['alarm']}" if record.get("alarm") else "")
    return TextAnnotation(
        timestamp=ts,
        position=Point2(x=2.0, y=2.0),
        text=text,
        font_size=max(6.0, width / 16),
        text_color=Color(r=r, g=g, b=b, a=1.0),
        background_color=Color(r=0.0, g=0.0, b=0.0, a=0.6),
    )
