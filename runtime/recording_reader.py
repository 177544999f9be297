"""The image messages of a recording, as frames: an MCAP file (Foxglove's ``CompressedImage`` /
``RawImage`` in protobuf or JSON, ROS 2's ``sensor_msgs/msg/CompressedImage`` / ``Image`` in CDR) or a
ROS 2 bag folder (``metadata.yaml`` and its storage files, read with ``rosbags``).

:func:`open_reader` gives a :class:`RecordingReader`: the image topic it reads, how many frames
and how long, and :meth:`RecordingReader.frames`, one pass of ``(frame or None, stamp_ns)`` in log
time order, ``stamp_ns`` the capture time each image message carries (its log time when it carries
none). Decoders come from the schemas embedded in the recording, never from code in it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .extras import require
from .imagecodec import decode_compressed, raw_to_frame

__all__ = [
    "IMAGE_SCHEMAS",
    "McapReader",
    "RecordingReader",
    "Ros2BagReader",
    "image_frame",
    "is_recording",
    "open_reader",
]

log = logging.getLogger("rrise.runtime")

COMPRESSED = ("foxglove.CompressedImage", "sensor_msgs/msg/CompressedImage")
RAW = ("foxglove.RawImage", "sensor_msgs/msg/Image")
IMAGE_SCHEMAS = COMPRESSED + RAW
PREFERRED_TOPIC = "/rrise/image/compressed"


def _field(msg: Any, name: str, default: Any = None) -> Any:
    return msg.get(name, default) if isinstance(msg, dict) else getattr(msg, name, default)


def _stamp(msg: Any, log_time: int) -> int:
    """The capture time a message carries: ``header.stamp`` (ROS) or ``timestamp`` (Foxglove)."""
    header = _field(msg, "header")
    t = _field(header, "stamp") if header is not None else _field(msg, "timestamp")
    if t is None:
        return int(log_time)
    sec = _field(t, "sec", _field(t, "seconds", 0)) or 0
    nsec = _field(t, "nanosec", _field(t, "nsec", _field(t, "nanos", 0))) or 0
    stamp = int(sec) * 1_000_000_000 + int(nsec)
    return stamp if stamp > 0 else int(log_time)


def _bytes(data: Any) -> bytes:
    if isinstance(data, str):  # JSON-encoded Foxglove messages carry base64
        return base64.b64decode(data)
    if isinstance(data, np.ndarray):
        return data.tobytes()
    return bytes(data)


def image_frame(schema_name: str, msg: Any) -> np.ndarray | None:
    """The frame in one image message (None when it does not decode: the stream gives an error
    record for it and goes on)."""
    data = _bytes(_field(msg, "data", b""))
    if schema_name in COMPRESSED:
        return decode_compressed(data)
    try:
        h, w = int(_field(msg, "height")), int(_field(msg, "width"))
        return raw_to_frame(str(_field(msg, "encoding")), h, w, int(_field(msg, "step")), data)
    except (TypeError, ValueError) as exc:
        log.warning("skipping an image message: %s", exc)
        return None


class _ProtobufDecoders:
    """mcap ``DecoderFactory`` for protobuf channels, from the FileDescriptorSet in the schema."""

    def __init__(self) -> None:
        self._classes: dict[int, Any] = {}

    def decoder_for(self, message_encoding: str, schema: Any) -> Any:
        if message_encoding != "protobuf" or schema is None or schema.encoding != "protobuf":
            return None
        if schema.id not in self._classes:
            require("google.protobuf", "reading protobuf MCAP channels")
            from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

            pool = descriptor_pool.DescriptorPool()
            for file in descriptor_pb2.FileDescriptorSet.FromString(schema.data).file:
                pool.Add(file)
            self._classes[schema.id] = message_factory.GetMessageClass(
                pool.FindMessageTypeByName(schema.name)
            )
        cls = self._classes[schema.id]
        return cls.FromString


class _JsonDecoders:
    """mcap ``DecoderFactory`` for JSON channels."""

    def decoder_for(self, message_encoding: str, schema: Any) -> Any:
        return (lambda data: json.loads(data)) if message_encoding == "json" else None


class RecordingReader:
    """One image topic of a recording; see the module docstring."""

    def __init__(self, path: Path, topic: str, schema_name: str, count: int | None, span_ns: int) -> None:
        self.path, self.topic, self.schema_name = path, topic, schema_name
        self.count, self.span_ns = count, span_ns

    @property
    def fps(self) -> float | None:
        """Frames per second as recorded (None when it cannot tell)."""
        if not self.count or self.count < 2 or self.span_ns <= 0:
            return None
        return (self.count - 1) / (self.span_ns / 1e9)

    def frames(self) -> Iterator[tuple[np.ndarray | None, int]]:
        raise NotImplementedError


def _choose(path: Path, topics: dict[str, str], topic: str | None) -> str:
    """The image topic to read: ``topic`` if given, else the only one, else rrise's own, else the
    first in name order (logged)."""
    if topic is not None:
        if topic not in topics:
            raise ValueError(f"recording {path} has no image topic {topic!r} (it has {sorted(topics)})")
        return topic
    if not topics:
        raise ValueError(f"recording {path} holds no image topic ({', '.join(IMAGE_SCHEMAS)})")
    if len(topics) == 1 or PREFERRED_TOPIC in topics:
        return next(iter(topics)) if len(topics) == 1 else PREFERRED_TOPIC
    chosen = sorted(topics)[0]
    log.warning("recording %s has image topics %s; replaying %s", path, sorted(topics), chosen)
    return chosen


class McapReader(RecordingReader):
    """The image topic of an MCAP file (any of :data:`IMAGE_SCHEMAS`, any of its encodings)."""

    def __init__(self, path: Path, topic: str | None = None) -> None:
        mcap_reader = require("mcap.reader", "replaying an MCAP recording")
        with open(path, "rb") as f:
            try:
                summary = mcap_reader.make_reader(f).get_summary()
            except Exception as exc:  # the mcap library raises several types on a damaged file
                raise ValueError(f"{path} is not a readable MCAP file: {exc}") from None
        if summary is None:
            raise ValueError(f"{path} has no MCAP summary section (an unfinished recording?)")
        topics = {
            ch.topic: summary.schemas[ch.schema_id].name
            for ch in summary.channels.values()
            if ch.schema_id in summary.schemas and summary.schemas[ch.schema_id].name in IMAGE_SCHEMAS
        }
        chosen = _choose(path, topics, topic)
        stats = summary.statistics
        ids = [i for i, ch in summary.channels.items() if ch.topic == chosen]
        count = sum(stats.channel_message_counts.get(i, 0) for i in ids) if stats else None
        span = (stats.message_end_time - stats.message_start_time) if stats else 0
        super().__init__(path, chosen, topics[chosen], count, span)

    def frames(self) -> Iterator[tuple[np.ndarray | None, int]]:
        mcap_reader = require("mcap.reader", "replaying an MCAP recording")
        ros2 = require("mcap_ros2.decoder", "replaying ROS 2 messages from MCAP")
        factories = [ros2.DecoderFactory(), _ProtobufDecoders(), _JsonDecoders()]
        with open(self.path, "rb") as f:
            reader = mcap_reader.make_reader(f, decoder_factories=factories)
            for schema, _channel, message, decoded in reader.iter_decoded_messages(topics=[self.topic]):
                yield image_frame(schema.name, decoded), _stamp(decoded, message.log_time)


class Ros2BagReader(RecordingReader):
    """The image topic of a ROS 2 bag folder (any storage ``rosbags`` reads: MCAP, SQLite 3)."""

    def __init__(self, path: Path, topic: str | None = None) -> None:
        require("rosbags.highlevel", "replaying a ROS 2 bag")
        with self._open(path) as reader:
            topics = {c.topic: c.msgtype for c in reader.connections if c.msgtype in IMAGE_SCHEMAS}
            chosen = _choose(path, topics, topic)
            count = sum(c.msgcount for c in reader.connections if c.topic == chosen)
            span = int(reader.duration) if count else 0
        super().__init__(path, chosen, topics[chosen], count, span)

    @staticmethod
    def _open(path: Path) -> Any:
        from rosbags.highlevel import AnyReader

        from .ros2_msgs import typestore

        reader = AnyReader([path], default_typestore=typestore())
        try:
            reader.open()
        except Exception as exc:  # rosbags raises its own error types for damaged bags
            raise ValueError(f"{path} is not a readable ROS 2 bag: {exc}") from None
        return contextlib.closing(reader)

    def frames(self) -> Iterator[tuple[np.ndarray | None, int]]:
        with self._open(self.path) as reader:
            connections = [c for c in reader.connections if c.topic == self.topic]
            for connection, log_time, raw in reader.messages(connections=connections):
                msg = reader.deserialize(raw, connection.msgtype)
                yield image_frame(connection.msgtype, msg), _stamp(msg, log_time)


def is_recording(path: Path) -> bool:
    """An MCAP file, or a ROS 2 bag folder (one with ``metadata.yaml``)."""
    if path.is_file():
        return path.suffix.lower() == ".mcap"
    return path.is_dir() and (path / "metadata.yaml").is_file()


def open_reader(path: str | Path, topic: str | None = None) -> RecordingReader:
    """A reader for an MCAP file or a ROS 2 bag folder; ValueError naming the file if it cannot."""
    path = Path(path)
    return McapReader(path, topic) if path.is_file() else Ros2BagReader(path, topic)
