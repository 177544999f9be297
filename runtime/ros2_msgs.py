"""The ROS 2 side of a record: the ``rrise_msgs/msg/CertifiedPrediction`` message, CDR-encoded with
rosbags' type system (pure Python: no ROS install), and ``sensor_msgs/msg/CompressedImage`` frames.

:data:`CERTIFIED_PREDICTION_MSG` is the message definition; the repository's ROS 2 package
``ros2/rrise_msgs`` holds the same text in ``msg/CertifiedPrediction.msg`` (a test keeps them equal),
so a robot that builds that package can ``ros2 bag play`` a recording and subscribe to it.
Mapping from the record (DESIGN §3): ``pred`` → ``class_id`` (−1 for nil), nil strings → ``""``,
nil ``score``/``p_lower`` → NaN, ``stamp_ns`` → ``header.stamp`` (``header.frame_id`` is the camera's
frame, ``"camera"``), ``bundle`` → ``bundle_id``; an adaptive run's ``certified_by`` (nil → ``""``)
and ``mc_draws`` as they are, and in a one-pass run (records without them) ``certified_by`` ``""``
and ``mc_draws`` −1; :func:`record_from_prediction` maps back (the adaptive keys only where
``mc_draws`` ≥ 0, and never from a message recorded before they existed).

A ROS 2 message has one fixed layout, so every run's message has the two fields (a topic keeps one
type whatever ``--mc-budget`` was); ``mc_draws`` −1 tells a one-pass frame from an adaptive one that
abstained without draws.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from rrise.records import RECORD_VERSION

from .extras import require

__all__ = [
    "CERTIFIED_PREDICTION",
    "CERTIFIED_PREDICTION_MSG",
    "COMPRESSED_IMAGE",
    "FRAME_ID",
    "IMAGE",
    "ONE_PASS_DRAWS",
    "compressed_image_message",
    "diagnostic_message",
    "prediction_fields",
    "prediction_message",
    "record_from_prediction",
    "stamp_ns_of",
    "typestore",
]

CERTIFIED_PREDICTION = "rrise_msgs/msg/CertifiedPrediction"
COMPRESSED_IMAGE = "sensor_msgs/msg/CompressedImage"
IMAGE = "sensor_msgs/msg/Image"
FRAME_ID = "camera"  # the header frame of images and predictions: one camera, one frame
ONE_PASS_DRAWS = -1  # ``mc_draws`` of a one-pass run's message (its records have no adaptive keys)

CERTIFIED_PREDICTION_MSG = """\
# One certified prediction of the RRISE runtime for one camera frame (a record of `rrise run`).
#
# Guarantee: if the calibration inputs and the deployed frames are exchangeable (drawn from the same
# distribution), then with probability at least 1 - alpha - beta (1 - alpha - beta - mc_alpha in an
# adaptive run, rrise run --mc-budget N) either abstain is true, or the smoothed classifier predicts
# class_id and is constant on the l2 ball of radius `radius` around the frame (in [0,1]-pixel units
# of the model input). alpha and beta are in the bundle (rrise inspect).

std_msgs/Header header  # stamp: the frame's capture time; frame_id: the camera's frame ("camera")
string source           # the stream's name (camera index, file, URL)
uint64 seq              # record number in this run; a gap means lost records
uint64 frame            # frame index in the source
int32 class_id          # predicted class; -1 when abstaining or when the frame has no prediction
string label            # that class's name; empty when class_id is -1
bool abstain            # true: no certified prediction for this frame
float64 radius          # certified l2 radius; 0 when abstaining
float64 score           # the surrogate's top-class probability; NaN when error is set
float64 p_lower         # the calibrated lower bound on the top-class probability; NaN when error is set
float64 latency_ms      # capture to publish, in milliseconds
string bundle_id        # the bundle's id (a digest of its canonical manifest)
string error            # empty, or why this frame has no prediction
string alarm            # empty, or the distribution-shift monitor's word
string certified_by     # adaptive run: surrogate or mc; empty when abstaining or in a one-pass run
int64 mc_draws          # base-model draws spent on this frame; -1 in a one-pass run (--mc-budget 0)
"""


@functools.lru_cache(maxsize=1)
def typestore() -> Any:
    """ROS 2 Jazzy's message types plus ``rrise_msgs/msg/CertifiedPrediction`` (rosbags)."""
    typesys = require("rosbags.typesys", "ROS 2 encoding")
    store = typesys.get_typestore(typesys.Stores.ROS2_JAZZY)
    store.register(typesys.get_types_from_msg(CERTIFIED_PREDICTION_MSG, CERTIFIED_PREDICTION))
    return store


def _header(store: Any, stamp_ns: int, frame_id: str) -> Any:
    time_cls = store.types["builtin_interfaces/msg/Time"]
    header_cls = store.types["std_msgs/msg/Header"]
    sec, nanosec = divmod(int(stamp_ns), 1_000_000_000)
    return header_cls(stamp=time_cls(sec=sec, nanosec=nanosec), frame_id=str(frame_id))


def stamp_ns_of(header: Any) -> int:
    """A ``std_msgs/Header``'s stamp in Unix nanoseconds."""
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def _nan_if_none(x: float | None) -> float:
    return math.nan if x is None else float(x)


def prediction_fields(record: dict[str, Any]) -> dict[str, Any]:
    """The ``CertifiedPrediction`` fields of a record, less ``header`` (for any ROS 2 client
    library: rosbags here, rclpy in ``examples/ros2_node.py``)."""
    pred = record.get("pred")
    return {
        "source": str(record.get("source") or ""),
        "seq": int(record["seq"]),
        "frame": int(record["frame"]),
        "class_id": -1 if pred is None else int(pred),
        "label": record.get("label") or "",
        "abstain": bool(record["abstain"]),
        "radius": float(record["radius"]),
        "score": _nan_if_none(record.get("score")),
        "p_lower": _nan_if_none(record.get("p_lower")),
        "latency_ms": float(record.get("latency_ms") or 0.0),
        "bundle_id": str(record.get("bundle") or ""),
        "error": record.get("error") or "",
        "alarm": record.get("alarm") or "",
        "certified_by": record.get("certified_by") or "",
        "mc_draws": int(record["mc_draws"]) if "mc_draws" in record else ONE_PASS_DRAWS,
    }


def prediction_message(record: dict[str, Any], store: Any | None = None, frame_id: str = FRAME_ID) -> Any:
    """A ``CertifiedPrediction`` for one record (serialize it with ``store.serialize_cdr``)."""
    store = store or typestore()
    header = _header(store, record["stamp_ns"], frame_id)
    return store.types[CERTIFIED_PREDICTION](header=header, **prediction_fields(record))


def record_from_prediction(msg: Any) -> dict[str, Any]:
    """The record a ``CertifiedPrediction`` message carries (the keys of DESIGN §3, and an adaptive
    run's ``certified_by`` and ``mc_draws``)."""

    def number(x: float) -> float | None:
        return None if math.isnan(x) else float(x)

    class_id = int(msg.class_id)
    record = {
        "v": RECORD_VERSION,
        "seq": int(msg.seq),
        "frame": int(msg.frame),
        "stamp_ns": stamp_ns_of(msg.header),
        "source": str(msg.source),
        "pred": None if class_id < 0 else class_id,
        "label": msg.label or None,
        "abstain": bool(msg.abstain),
        "radius": float(msg.radius),
        "score": number(msg.score),
        "p_lower": number(msg.p_lower),
        "latency_ms": float(msg.latency_ms),
        "bundle": str(msg.bundle_id),
        "error": msg.error or None,
        "alarm": msg.alarm or None,
    }
    draws = int(getattr(msg, "mc_draws", ONE_PASS_DRAWS))  # absent: recorded before adaptive runs
    if draws != ONE_PASS_DRAWS:
        record.update(certified_by=msg.certified_by or None, mc_draws=draws)
    return record


def compressed_image_message(
    jpeg: bytes, stamp_ns: int, store: Any | None = None, frame_id: str = FRAME_ID
) -> Any:
    """A ``sensor_msgs/msg/CompressedImage`` (format ``jpeg``) stamped ``stamp_ns``."""
    store = store or typestore()
    return store.types[COMPRESSED_IMAGE](
        header=_header(store, stamp_ns, frame_id),
        format="jpeg",
        data=np.frombuffer(jpeg, dtype=np.uint8),
    )


def diagnostic_message(status: dict[str, Any], level: str, text: str, store: Any | None = None) -> Any:
    """A ``diagnostic_msgs/msg/DiagnosticArray`` for one status record: one ``DiagnosticStatus``
    named ``rrise`` (level OK, WARN or ERROR; ``text`` as its message; every status key as a value)."""
    store = store or typestore()
    status_cls = store.types["diagnostic_msgs/msg/DiagnosticStatus"]
    key_value = store.types["diagnostic_msgs/msg/KeyValue"]
    levels = {"ok": status_cls.OK, "warning": status_cls.WARN, "error": status_cls.ERROR}
    values = [key_value(key=str(k), value="" if v is None else str(v)) for k, v in status.items()]
    entry = status_cls(
        level=levels[level],
        name="rrise",
        message=text,
        hardware_id=str(status.get("source") or ""),
        values=values,
    )
    header = _header(store, int(status["stamp_ns"]), FRAME_ID)
    return store.types["diagnostic_msgs/msg/DiagnosticArray"](header=header, status=[entry])
