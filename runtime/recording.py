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
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rrise._version import __version__
from rrise.fileio import output_conflict

from .extras import require
from .foxglove_channels import IMAGE_TOPIC, PREDICTION_TOPIC, FoxgloveChannels
from .status_text import status_level, status_line

__all__ = ["RECORD_FORMATS", "FoxgloveMcapRecorder", "Ros2BagRecorder", "open_recorder"]

RECORD_FORMATS = ("foxglove", "ros2")
DIAGNOSTICS_TOPIC = "/diagnostics"
DIAGNOSTIC_ARRAY = "diagnostic_msgs/msg/DiagnosticArray"


class RecordingError(ValueError):
    """A recording that cannot be started (its path exists, or has the wrong form)."""


class FoxgloveMcapRecorder:
    """Writes one ``.mcap`` file with Foxglove's schemas (see the module docstring); ``adaptive``:
    the run's records carry the adaptive keys."""

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

    def write(self, record: dict[str, Any], jpeg: bytes | None, width: int) -> None:
        self._meta.setdefault("bundle", str(record.get("bundle")))
        self._meta.setdefault("source", str(record.get("source")))
        self._channels.log(record, jpeg, width)
        self.records += 1
        self.frames += jpeg is not None

    def write_status(self, status: dict[str, Any]) -> None:
        self._channels.log_status(status)

    def close(self) -> None:
        if self._writer is None:
            return
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

    def write(self, record: dict[str, Any], jpeg: bytes | None, width: int) -> None:
        from .ros2_msgs import (
            CERTIFIED_PREDICTION,
            COMPRESSED_IMAGE,
            compressed_image_message,
            prediction_message,
        )

        stamp = int(record["stamp_ns"])
        if jpeg is not None:
            image = compressed_image_message(jpeg, stamp, self._store)
            self._bag.write(self._image, stamp, self._store.serialize_cdr(image, COMPRESSED_IMAGE))
            self.frames += 1
        message = prediction_message(record, self._store)
        self._bag.write(self._prediction, stamp, self._store.serialize_cdr(message, CERTIFIED_PREDICTION))
        self.records += 1

    def write_status(self, status: dict[str, Any]) -> None:
        from .ros2_msgs import diagnostic_message

        message = diagnostic_message(status, status_level(status), status_line(status), self._store)
        stamp = int(status["stamp_ns"])
        data = self._store.serialize_cdr(message, DIAGNOSTIC_ARRAY)
        self._bag.write(self._diagnostics, stamp, data)

    def close(self) -> None:
        if self._bag is not None:
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
