"""``rrise run --record``: the frames and the records of a run, written as it goes.

Two formats, each opened by Foxglove as is:

* ``foxglove`` (a ``.mcap`` file, written by ``foxglove-sdk``): the channels of
  :mod:`rrise.runtime.foxglove_channels` (JPEG ``foxglove.CompressedImage`` and
  ``foxglove.ImageAnnotations`` in protobuf, the records and status records as JSON with a JSON
  schema), every message logged at its frame's ``stamp_ns``; a metadata record ``rrise`` names the
  bundle and the source.
* ``ros2`` (a ROS 2 bag folder, written by ``rosbags``: ``metadata.yaml`` and one MCAP file,
  rosbag2 format version 8, CDR): ``/rrise/image/compressed`` as ``sensor_msgs/msg/CompressedImage``
  (JPEG), ``/rrise/prediction`` as ``rrise_msgs/msg/CertifiedPrediction`` and ``/diagnostics`` as
  ``diagnostic_msgs/msg/DiagnosticArray`` (the status records), so ``ros2 bag play`` replays it on a
  robot that has built ``ros2/rrise_msgs``.

Neither overwrites: a path that exists is refused before the run starts. An adaptive run's keys
(``certified_by``, ``mc_draws``) are in both: in the JSON records under the adaptive schemas of
:mod:`rrise.runtime.foxglove_channels` (a one-pass recording's schemas and messages are unchanged),
and in every ``CertifiedPrediction`` (``mc_draws`` −1 in a one-pass run, see
:mod:`rrise.runtime.ros2_msgs`).

Crash safety: both writers keep the newest messages in an open MCAP chunk in memory and write the
summary section (and, for a bag, ``metadata.yaml``) only when the run ends in order. A recorder
therefore closes its open chunk and flushes the file every :data:`FLUSH_INTERVAL_S` (1 s) of wall
time while messages wait, in a thread of its own (so a stalled source does not hold them back), and
a chunk also closes when it reaches 1 MiB. A process that is killed (``kill -9``, the OOM killer, a
crash) loses at most the messages of its last ~1 s; the file it leaves has no summary, and
``--source`` salvages its complete chunks (:mod:`rrise.runtime.recording_reader`). The flush hands
the data to the operating system and does not ``fsync``: a power cut may lose what the OS still
held. One second keeps a crash's loss to about a second of frames, as a camera's operator would
expect, while chunks stay large enough (tens of frames at camera rates) to compress and index well.
For the ROS 2 bag the flush closes the chunk of ``rosbags``' MCAP storage writer (``close_chunk``),
which has no flush of its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rrise._version import __version__
from rrise.fileio import output_conflict

from .extras import require
from .foxglove_channels import IMAGE_TOPIC, PREDICTION_TOPIC, FoxgloveChannels
from .status_text import status_level, status_line

__all__ = [
    "FLUSH_INTERVAL_S",
    "RECORD_FORMATS",
    "FoxgloveMcapRecorder",
    "PeriodicFlush",
    "Ros2BagRecorder",
    "open_recorder",
]

log = logging.getLogger("rrise.runtime")

RECORD_FORMATS = ("foxglove", "ros2")
DIAGNOSTICS_TOPIC = "/diagnostics"
DIAGNOSTIC_ARRAY = "diagnostic_msgs/msg/DiagnosticArray"
FLUSH_INTERVAL_S = 1.0  # the longest a written message waits in memory (see the module docstring)


class RecordingError(ValueError):
    """A recording that cannot be started (its path exists, or has the wrong form)."""


class PeriodicFlush:
    """Calls ``flush`` every ``interval_s`` seconds, from a daemon thread, while messages written
    under :meth:`writing` wait for it; :meth:`stop` ends the thread (the caller then closes its
    file). A flush that fails is logged and the next one tries again.

    Parameters
    ----------
    flush
        Writes what the recorder holds in memory to its file (called with :attr:`lock` held).
    name
        The recording, for the thread's name and the log.
    interval_s
        Seconds between flushes.
    """

    def __init__(self, flush: Callable[[], None], name: str, interval_s: float = FLUSH_INTERVAL_S) -> None:
        self.lock = threading.Lock()
        self.name, self.interval_s, self.flushes = name, interval_s, 0
        self._flush, self._dirty = flush, False
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rrise-flush {name}", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the lock while the recorder writes; what it wrote waits for the next flush."""
        with self.lock:
            yield
            self._dirty = True

    def _run(self) -> None:
        while not self._stopped.wait(self.interval_s):
            self.flush_now()

    def flush_now(self) -> None:
        """Flush what was written since the last flush (nothing when nothing was, or once stopped)."""
        with self.lock:
            if not self._dirty or self._stopped.is_set():
                return
            self._dirty = False
            try:
                self._flush()
                self.flushes += 1
            except Exception as exc:  # the file system's errors are many; the run goes on
                log.warning("recording %s: flushing to disk failed: %s", self.name, exc)

    def stop(self) -> None:
        """End the flush thread (the recorder closes its file in order after this)."""
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join()


class FoxgloveMcapRecorder:
    """Writes one ``.mcap`` file with Foxglove's schemas (see the module docstring); ``adaptive``:
    the run's records carry the adaptive keys. Flushed every :data:`FLUSH_INTERVAL_S`."""

    def __init__(self, path: str | os.PathLike, *, adaptive: bool = False) -> None:
        fg = require("foxglove", "--record (format foxglove)")
        self.path = Path(path)
        if self.path.suffix.lower() != ".mcap":
            raise RecordingError(f"--record {self.path}: a Foxglove recording is a file ending in .mcap")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._context = fg.Context()
        self._writer = fg.open_mcap(self.path, context=self._context, allow_overwrite=False)
        self._channels = FoxgloveChannels(self._context, adaptive=adaptive)
        self._meta: dict[str, str] = {"rrise_version": __version__}
        self.frames = self.records = 0
        self.flusher = PeriodicFlush(self._writer.flush, str(self.path))

    def write(self, record: dict[str, Any], jpeg: bytes | None, width: int) -> None:
        self._meta.setdefault("bundle", str(record.get("bundle")))
        self._meta.setdefault("source", str(record.get("source")))
        with self.flusher.writing():
            self._channels.log(record, jpeg, width)
        self.records += 1
        self.frames += jpeg is not None

    def write_status(self, status: dict[str, Any]) -> None:
        with self.flusher.writing():
            self._channels.log_status(status)

    def close(self) -> None:
        if self._writer is None:
            return
        self.flusher.stop()
        self._meta["frames"] = str(self.frames)
        self._writer.write_metadata("rrise", self._meta)
        self._channels.close()
        self._writer.close()
        self._writer = None


class Ros2BagRecorder:
    """Writes a ROS 2 bag folder (MCAP storage, CDR; see the module docstring)."""

    def __init__(self, path: str | os.PathLike) -> None:
        rosbag2 = require("rosbags.rosbag2", "--record (format ros2)")
        from .ros2_msgs import CERTIFIED_PREDICTION, COMPRESSED_IMAGE, typestore

        self.path = Path(path)
        if self.path.suffix.lower() in (".mcap", ".db3"):
            raise RecordingError(
                f"--record {self.path}: a ROS 2 bag is a folder; give a folder name, e.g. run_bag"
            )
        if self.path.exists():
            raise RecordingError(f"--record {self.path} exists already: give a new folder name")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._store = typestore()
        self._bag = rosbag2.Writer(self.path, version=8, storage_plugin=rosbag2.StoragePlugin.MCAP)
        self._bag.open()
        add = self._bag.add_connection
        self._image = add(IMAGE_TOPIC, COMPRESSED_IMAGE, typestore=self._store)
        self._prediction = add(PREDICTION_TOPIC, CERTIFIED_PREDICTION, typestore=self._store)
        self._diagnostics = add(
            DIAGNOSTICS_TOPIC, "diagnostic_msgs/msg/DiagnosticArray", typestore=self._store
        )
        self._bag.set_custom_data("rrise_version", __version__)
        self.frames = self.records = 0
        if not callable(getattr(self._bag.storage, "close_chunk", None)):
            log.warning(
                "--record %s: this rosbags version's MCAP writer cannot close a chunk early; a crash "
                "may lose the whole recording",
                self.path,
            )
        self.flusher = PeriodicFlush(self._flush, str(self.path))

    def _flush(self) -> None:
        """Close the storage writer's open chunk (if it holds a message) and flush its file."""
        storage = self._bag.storage if self._bag is not None else None
        chunk = getattr(storage, "chunk", None)
        if chunk is None or not getattr(chunk, "msgs", None) or not hasattr(storage, "close_chunk"):
            return
        storage.close_chunk()
        storage.bio.flush()

    def write(self, record: dict[str, Any], jpeg: bytes | None, width: int) -> None:
        from .ros2_msgs import (
            CERTIFIED_PREDICTION,
            COMPRESSED_IMAGE,
            compressed_image_message,
            prediction_message,
        )

        stamp = int(record["stamp_ns"])
        message = self._store.serialize_cdr(prediction_message(record, self._store), CERTIFIED_PREDICTION)
        image = None
        if jpeg is not None:
            image = self._store.serialize_cdr(
                compressed_image_message(jpeg, stamp, self._store), COMPRESSED_IMAGE
            )
        with self.flusher.writing():
            if image is not None:
                self._bag.write(self._image, stamp, image)
            self._bag.write(self._prediction, stamp, message)
        self.frames += image is not None
        self.records += 1

    def write_status(self, status: dict[str, Any]) -> None:
        from .ros2_msgs import diagnostic_message

        message = diagnostic_message(status, status_level(status), status_line(status), self._store)
        stamp = int(status["stamp_ns"])
        data = self._store.serialize_cdr(message, DIAGNOSTIC_ARRAY)
        with self.flusher.writing():
            self._bag.write(self._diagnostics, stamp, data)

    def close(self) -> None:
        if self._bag is not None:
            self.flusher.stop()
            self._bag.close()
            self._bag = None


def open_recorder(
    path: str | os.PathLike, fmt: str = "foxglove", *, adaptive: bool = False
) -> FoxgloveMcapRecorder | Ros2BagRecorder:
    """A recorder for ``--record PATH`` in format ``fmt`` (``foxglove``: a ``.mcap`` file; ``ros2``: a
    ROS 2 bag folder); ``adaptive``: the run's records carry the adaptive keys (``--mc-budget`` >
    0). Refuses a path that exists."""
    if fmt not in RECORD_FORMATS:
        raise RecordingError(f"--record-format must be one of {', '.join(RECORD_FORMATS)}, got {fmt!r}")
    conflict = output_conflict("--record", path)
    if conflict is not None:
        raise RecordingError(conflict)
    return FoxgloveMcapRecorder(path, adaptive=adaptive) if fmt == "foxglove" else Ros2BagRecorder(path)
