"""The image messages of a recording, as frames: an MCAP file (Foxglove's ``CompressedImage`` /
``RawImage`` in protobuf or JSON, ROS 2's ``sensor_msgs/msg/CompressedImage`` / ``Image`` in CDR) or a
ROS 2 bag folder (``metadata.yaml`` and its storage files, read with ``rosbags``).

:func:`open_reader` gives a :class:`RecordingReader`: the image topic it reads, how many frames
and how long, and :meth:`RecordingReader.frames`, one pass of ``(frame or None, stamp_ns)`` in log
time order, ``stamp_ns`` the capture time each image message carries (its log time when it carries
none). Decoders come from the schemas embedded in the recording, never from code in it.

Damage: messages are decoded one at a time, and one that does not decode gives ``(None, stamp)``
and a warning (the stream makes an error record of it and goes on). An MCAP file without a readable
summary section (a recording killed before it finished, or cut short) is salvaged: it is read record
by record in file order up to the first record that cannot be read (the chunk being written when
it stopped), skipping a chunk whose data fails its CRC, with a warning that names the file and how
many image messages it gave, and :attr:`RecordingReader.ended_early` says so. A complete MCAP file
is read chunk by chunk from its index: a damaged chunk is skipped, and ``ended_early`` names it and
says how many of the announced frames were read (a ROS 2 bag read with ``rosbags`` stops at the
damage instead). A ROS 2 bag folder without ``metadata.yaml`` (a crashed bag) or whose storage
``rosbags`` cannot open is read from its one ``.mcap`` storage file the same way, with a warning.
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
    "UnreadableRecording",
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


MAX_DECODE_WARNINGS = 5  # messages that do not decode named in a warning per pass; the rest counted


def _undecodable(path: Path, failures: int, log_time: int, topic: str, exc: Exception) -> None:
    """Warn that the ``failures``-th message of a pass (at ``log_time`` on ``topic``) does not decode."""
    if failures > MAX_DECODE_WARNINGS:
        return
    more = " (further ones are not logged)" if failures == MAX_DECODE_WARNINGS else ""
    log.warning(
        "recording %s: the message at %d on %s does not decode (%s: %s); an error record stands for it%s",
        path,
        log_time,
        topic,
        type(exc).__name__,
        exc,
        more,
    )


class _MessageDecoder:
    """Decodes one message at a time (the decoders of the recording's own schemas: ROS 2 CDR,
    protobuf, JSON): a message that fails to decode gives ``(None, log_time)`` and a warning, so
    the stream makes an error record of it and goes on."""

    def __init__(self, path: Path) -> None:
        ros2 = require("mcap_ros2.decoder", "replaying ROS 2 messages from MCAP")
        self.path, self.failures = path, 0
        self._factories = [ros2.DecoderFactory(), _ProtobufDecoders(), _JsonDecoders()]
        self._decoders: dict[int, Any] = {}

    def frame(self, schema: Any, channel: Any, message: Any) -> tuple[np.ndarray | None, int]:
        """The frame and capture stamp of one image message, or ``(None, log_time)``."""
        try:
            decoded = self._decoder(schema, channel)(message.data)
            return image_frame(schema.name, decoded), _stamp(decoded, message.log_time)
        except Exception as exc:  # any decoder's error: this message is skipped, not the replay
            self.failures += 1
            _undecodable(self.path, self.failures, message.log_time, channel.topic, exc)
            return None, int(message.log_time)

    def _decoder(self, schema: Any, channel: Any) -> Any:
        if channel.id not in self._decoders:
            for factory in self._factories:
                decoder = factory.decoder_for(channel.message_encoding, schema)
                if decoder is not None:
                    break
            else:
                raise ValueError(f"no decoder for message encoding {channel.message_encoding!r}")
            self._decoders[channel.id] = decoder
        return self._decoders[channel.id]


def _problem(exc: Exception, what: str = "record") -> str:
    """What stopped a read of an MCAP file (at a ``what``: record, chunk), in words."""
    name = type(exc).__name__
    if name == "EndOfFile":
        return "the end of the file, cut short before the records that close an MCAP file"
    if name == "RecordLengthLimitExceeded":
        return "a record that runs past the end of the file, a chunk still being written"
    if name == "CRCValidationError":
        what = "a chunk" if type(getattr(exc, "record", None)).__name__ == "Chunk" else "the data section"
        return f"{what} that fails its CRC check, damaged data"
    return f"a damaged {what} ({name}: {exc})"


def _stream_messages(path: Path, stopped: list[str]) -> Iterator[tuple[Any, Any, Any]]:
    """``(schema, channel, message)`` of every message of the MCAP file at ``path``, read record by
    record in file order without its summary. A chunk whose data is damaged is skipped; the read ends
    cleanly at the first record that cannot be read (cut short, its length damaged). Each is noted
    in ``stopped``."""
    require("mcap", "replaying an MCAP recording")
    from mcap.records import Channel, Message, Schema
    from mcap.stream_reader import StreamReader

    schemas: dict[int, Any] = {}
    channels: dict[int, Any] = {}
    with open(path, "rb") as f:
        limit = max(path.stat().st_size, 1)  # no record is larger than the file
        records = StreamReader(f, emit_chunks=True, validate_crcs=True, record_size_limit=limit).records
        while True:
            try:
                record = next(records)
            except StopIteration:
                return
            except Exception as exc:  # a damaged record, of any kind
                stopped.append(f"reading stopped at {_problem(exc)}")
                return
            for inner in _unchunked(record, stopped):
                if isinstance(inner, Schema):
                    schemas[inner.id] = inner
                elif isinstance(inner, Channel):
                    channels[inner.id] = inner
                elif isinstance(inner, Message) and inner.channel_id in channels:
                    channel = channels[inner.channel_id]
                    yield schemas.get(channel.schema_id), channel, inner


def _unchunked(record: Any, skipped: list[str]) -> list[Any]:
    """The records in ``record`` if it is a chunk (none when its data is damaged: noted in
    ``skipped``), else ``record`` itself."""
    from mcap.records import Chunk
    from mcap.stream_reader import breakup_chunk

    if not isinstance(record, Chunk):
        return [record]
    try:
        return breakup_chunk(record, validate_crc=True)
    except Exception as exc:  # a damaged chunk, of any kind: skip it, read on
        skipped.append(f"{_problem(exc, 'chunk')} was skipped")
        return []


def _indexed_messages(
    path: Path, summary: Any, topic: str, skipped: list[str]
) -> Iterator[tuple[Any, Any, Any]]:
    """``(schema, channel, message)`` of ``topic`` in log-time order, chunk by chunk as the summary's
    chunk index lists them (chunks whose times overlap are merged); a chunk that cannot be read
    (damaged) is skipped, noted in ``skipped``, and the read goes on with the next."""
    ids = {i for i, ch in summary.channels.items() if ch.topic == topic}
    chunks = sorted(
        (
            c
            for c in summary.chunk_indexes
            if not c.message_index_offsets or ids & set(c.message_index_offsets)
        ),
        key=lambda c: (c.message_start_time, c.chunk_start_offset),
    )
    with open(path, "rb") as f:
        group: list[Any] = []
        end = 0  # the latest message time in the group
        for chunk in chunks:
            if group and chunk.message_start_time > end:
                yield from _chunk_group(f, summary, group, ids, skipped)
                group = []
            end = max(end, chunk.message_end_time) if group else chunk.message_end_time
            group.append(chunk)
        yield from _chunk_group(f, summary, group, ids, skipped)


def _chunk_group(
    f: Any, summary: Any, group: list[Any], ids: set[int], skipped: list[str]
) -> Iterator[tuple[Any, Any, Any]]:
    """The messages of ``ids`` in the chunks of ``group``, in log-time order (damaged chunks skipped)."""
    from mcap.data_stream import ReadDataStream
    from mcap.records import Chunk, Message
    from mcap.stream_reader import breakup_chunk

    found: list[Any] = []
    for index in group:
        try:
            f.seek(index.chunk_start_offset + 1 + 8)  # past the record's opcode and length
            records = breakup_chunk(Chunk.read(ReadDataStream(f)), validate_crc=True)
        except Exception as exc:  # a damaged chunk, of any kind: skip it, keep the others
            skipped.append(f"{_problem(exc, 'chunk')} at byte {index.chunk_start_offset} was skipped")
            continue
        found.extend(r for r in records if isinstance(r, Message) and r.channel_id in ids)
    found.sort(key=lambda m: m.log_time)
    for message in found:
        channel = summary.channels[message.channel_id]
        yield summary.schemas.get(channel.schema_id), channel, message


class UnreadableRecording(ValueError):
    """A recording that cannot be opened at all (not an MCAP file, a bag ``rosbags`` refuses)."""


class RecordingReader:
    """One image topic of a recording; see the module docstring. ``ended_early``: why the
    recording gives fewer frames than it should (cut short, damaged), or None."""

    def __init__(self, path: Path, topic: str, schema_name: str, count: int | None, span_ns: int) -> None:
        self.path, self.topic, self.schema_name = path, topic, schema_name
        self.count, self.span_ns = count, span_ns
        self.ended_early: str | None = None

    def _check_pass(self, read: int, stopped: list[str]) -> None:
        """After a whole pass of ``read`` messages: a read stopped by damage, or short of the count
        the recording announces, ended early (said once, in :attr:`ended_early` and a warning)."""
        if self.ended_early is not None or (not stopped and (self.count is None or read >= self.count)):
            return
        if stopped:
            why = stopped[0] if len(stopped) == 1 else f"{stopped[0]} (and {len(stopped) - 1} more)"
        else:
            why = "its image messages end before the count its summary announces"
        self.ended_early = (
            f"recording {self.path} is damaged: {why}; {read} of its {self.count} image messages on "
            f"{self.topic} were read"
        )
        log.warning("%s", self.ended_early)

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
    """The image topic of an MCAP file (any of :data:`IMAGE_SCHEMAS`, any of its encodings); a file
    without a readable summary is salvaged (see the module docstring)."""

    def __init__(self, path: Path, topic: str | None = None) -> None:
        mcap_reader = require("mcap.reader", "replaying an MCAP recording")
        self.salvaged, self._summary = False, None
        with open(path, "rb") as f:
            try:
                summary = mcap_reader.make_reader(f).get_summary()
            except Exception:  # the mcap library raises several types on a damaged file
                summary = None
        if summary is None:
            self._salvage(path, topic)
            return
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
        self._summary = summary

    def _salvage(self, path: Path, topic: str | None) -> None:
        """Open a file without a readable summary: one pass record by record finds its image
        topics and how many of their messages are whole."""
        stopped: list[str] = []
        topics: dict[str, str] = {}
        times: dict[str, list[int]] = {}
        for schema, channel, message in _stream_messages(path, stopped):
            if schema is not None and schema.name in IMAGE_SCHEMAS:
                topics.setdefault(channel.topic, schema.name)
                times.setdefault(channel.topic, []).append(message.log_time)
        if not topics:
            where = f" ({stopped[0]})" if stopped else ""
            raise UnreadableRecording(
                f"{path} is not a readable MCAP file: it has no readable summary section, and no whole "
                f"image message to salvage{where}"
            )
        chosen = _choose(path, topics, topic)
        got = times[chosen]
        super().__init__(path, chosen, topics[chosen], len(got), max(got) - min(got))
        self.salvaged = True
        where = "; ".join(stopped) if stopped else "it ends without its closing records"
        self.ended_early = (
            f"recording {path} ended early: it has no readable summary section (it did not finish, "
            f"e.g. its recorder was killed, or its end is damaged); {len(got)} frames salvaged on "
            f"{chosen}, read record by record: {where}"
        )
        log.warning(
            "recording %s did not finish (no readable summary section): salvaged %d image messages on %s; %s",
            path,
            len(got),
            chosen,
            where,
        )

    def _messages(self, stopped: list[str]) -> Iterator[tuple[Any, Any, Any]]:
        """``(schema, channel, message)`` of the chosen topic; ends cleanly at damage (noted in
        ``stopped``)."""
        if self._summary is None or not self._summary.chunk_indexes:  # no index: read in file order
            yield from (m for m in _stream_messages(self.path, stopped) if m[1].topic == self.topic)
            return
        yield from _indexed_messages(self.path, self._summary, self.topic, stopped)

    def frames(self) -> Iterator[tuple[np.ndarray | None, int]]:
        decoder = _MessageDecoder(self.path)
        stopped: list[str] = []
        read = 0
        for schema, channel, message in self._messages(stopped):
            read += 1
            yield decoder.frame(schema, channel, message)
        self._check_pass(read, stopped)


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
            raise UnreadableRecording(f"{path} is not a readable ROS 2 bag: {exc}") from None
        return contextlib.closing(reader)

    def _messages(self, reader: Any, stopped: list[str]) -> Iterator[tuple[Any, int, bytes]]:
        """``(connection, log_time, raw)`` of the chosen topic; ends cleanly at damage."""
        connections = [c for c in reader.connections if c.topic == self.topic]
        messages = reader.messages(connections=connections)
        while True:
            try:
                item = next(messages)
            except StopIteration:
                return
            except Exception as exc:  # a damaged storage file, of any kind: keep what came
                stopped.append(f"reading stopped at {_problem(exc)}")
                return
            yield item

    def frames(self) -> Iterator[tuple[np.ndarray | None, int]]:
        stopped: list[str] = []
        read = failures = 0
        with self._open(self.path) as reader:
            for connection, log_time, raw in self._messages(reader, stopped):
                read += 1
                try:
                    msg = reader.deserialize(raw, connection.msgtype)
                    item = image_frame(connection.msgtype, msg), _stamp(msg, log_time)
                except Exception as exc:  # one message that does not decode is skipped, not the bag
                    failures += 1
                    _undecodable(self.path, failures, log_time, self.topic, exc)
                    item = None, int(log_time)
                yield item
        self._check_pass(read, stopped)


def _crashed_bag_storage(path: Path) -> Path | None:
    """The one MCAP storage file of a ROS 2 bag folder without ``metadata.yaml`` (a bag whose
    recorder was killed: ``metadata.yaml`` is written last), named after the folder
    (``NAME.mcap`` as ``rosbags`` writes it, ``NAME_0.mcap`` as ``ros2 bag record`` does); else None."""
    if not path.is_dir() or (path / "metadata.yaml").exists():
        return None
    storage = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".mcap"]
    if len(storage) != 1 or storage[0].stem not in (path.name, f"{path.name}_0"):
        return None
    return storage[0]


def _bag_storage(path: Path) -> Path | None:
    """The one ``.mcap`` storage file of a bag folder (None when it has none or several)."""
    storage = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".mcap"]
    return storage[0] if len(storage) == 1 else None


def is_recording(path: Path) -> bool:
    """An MCAP file, or a ROS 2 bag folder (one with ``metadata.yaml``, or a crashed one: no
    ``metadata.yaml`` and one MCAP storage file named after the folder)."""
    if path.is_file():
        return path.suffix.lower() == ".mcap"
    if path.is_dir() and (path / "metadata.yaml").is_file():
        return True
    return _crashed_bag_storage(path) is not None


def open_reader(path: str | Path, topic: str | None = None) -> RecordingReader:
    """A reader for an MCAP file or a ROS 2 bag folder; ValueError naming the file if it cannot.
    A bag without ``metadata.yaml``, or one ``rosbags`` cannot open, is read from its MCAP storage
    file (salvaged when it did not finish), with a warning."""
    path = Path(path)
    if path.is_file():
        return McapReader(path, topic)
    storage = _crashed_bag_storage(path)
    if storage is not None:
        log.warning(
            "ROS 2 bag %s has no metadata.yaml (its recorder did not finish: a crash?); reading its "
            "storage file %s directly",
            path,
            storage.name,
        )
        return McapReader(storage, topic)
    try:
        return Ros2BagReader(path, topic)
    except UnreadableRecording as exc:
        storage = _bag_storage(path) if path.is_dir() else None
        if storage is None:
            raise
        log.warning("%s; reading its storage file %s directly", exc, storage.name)
        return McapReader(storage, topic)
