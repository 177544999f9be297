"""A recorded run for the recording, replay and live-view tests: frames pushed with known capture
stamps through ``run_stream``, written as JSON lines and as the requested frame outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from rrise.runtime import run_stream
from rrise.runtime.sources import PushSource
from tests.runtime_fixtures import run_options, sample_frames

START_NS = 1_700_000_000_000_000_000  # capture time of the first frame
STEP_NS = 40_000_000  # 25 fps


def stamps(n: int) -> list[int]:
    return [START_NS + i * STEP_NS for i in range(n)]


def colour_frames(n: int, size: int = 28, seed: int = 3) -> list[np.ndarray]:
    """BGR uint8 frames, some plain (they certify), some noisy."""
    return [np.repeat(f[:, :, None], 3, axis=2) for f in sample_frames(n, size, seed)]


def record_run(
    bundle: Path, out: Path, frames: list[np.ndarray | None], **options: Any
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Certify ``frames`` (stamped :func:`stamps`) into ``out/records.jsonl`` and the outputs
    ``options`` ask for (run options by leaf name, e.g. ``record=...``); returns the records and the
    run's summary."""
    source = PushSource("pushed", live=False, capacity=len(frames) + 1)
    for frame, stamp in zip(frames, stamps(len(frames))):
        source.push(frame, stamp_ns=stamp)
    source.end()
    jsonl = out / "records.jsonl"
    summary = run_stream(bundle, source, run_options(jsonl=str(jsonl), **options))
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    return records, summary


def write_frames(
    recorder: Any, records: list[dict[str, Any]], frames: list[np.ndarray | None], per_chunk: int = 0
) -> None:
    """Write ``records`` with their ``frames`` (as JPEG) into an open recorder, closing a chunk on
    disk after every ``per_chunk`` frames (0: never; the recorder's own flush thread may); the
    recorder is left open."""
    import cv2

    for i, (record, frame) in enumerate(zip(records, frames), start=1):
        jpeg = None if frame is None else cv2.imencode(".jpg", frame)[1].tobytes()
        recorder.write(record, jpeg, 0 if frame is None else int(frame.shape[1]))
        if per_chunk and i % per_chunk == 0:
            recorder.flusher.flush_now()


def chunk_spans(path: Path) -> list[tuple[int, int]]:
    """``(start, length)`` in bytes of each chunk of a complete MCAP file, in file order."""
    from mcap.reader import make_reader

    with open(path, "rb") as f:
        indexes = make_reader(f).get_summary().chunk_indexes
    return sorted((c.chunk_start_offset, c.chunk_length) for c in indexes)
