"""`rrise demo`: every stage in order, then the runtime on a video of test images, publishing records
over ZeroMQ to a subscriber in another process, and once more in adaptive mode (base-model draws
where the surrogate's radius falls short, routed by the bundle's rule)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from rrise.fileio import atomic_path, read_json
from rrise.sequential import DEFAULT_MC_BATCH

from .adaptive_eval import KIND_ADAPTIVE, KIND_COHEN, KIND_REQUIRED, KIND_SURROGATE, ROW_RADII
from .adaptive_workdir import ROUTING_BUDGET
from .provenance import read_record
from .stages import OPTIONAL_STAGES, STAGES, run_stage
from .workdir import Workdir

__all__ = [
    "adaptive_summary_rows",
    "free_tcp_port",
    "run_adaptive_demo",
    "run_demo",
    "stage_runtime_demo",
    "write_demo_video",
]

# The radius the adaptive run asks for where the bundle states no routing rule (no rule-selection
# counts in the profile, e.g. digits).
DEMO_REQUIRED_RADIUS = ROW_RADII[1]


def write_demo_video(path: Path, images: np.ndarray, scale: int = 4, fps: int = 10) -> Path:
    """Write test images as a video (nearest-neighbour ×scale, MJPG), like a small camera stream."""
    import cv2

    _, c, h, wd = images.shape
    size = (wd * scale, h * scale)
    with atomic_path(path, suffix=path.suffix) as tmp:
        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
        if not writer.isOpened():
            raise RuntimeError(f"OpenCV cannot write {path}")
        for img in images:
            u8 = np.clip(np.rint(img.transpose(1, 2, 0) * 255), 0, 255).astype(np.uint8)
            u8 = cv2.resize(u8, size, interpolation=cv2.INTER_NEAREST)
            writer.write(cv2.cvtColor(u8, cv2.COLOR_GRAY2BGR if c == 1 else cv2.COLOR_RGB2BGR))
        writer.release()
    return path


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stream_to_subscriber(bundle: Path, video: Path, endpoint: str, count: int, received: Path):
    """Run the runtime on ``video`` publishing on ``endpoint`` while `rrise subscribe` (another
    process) writes what it receives to ``received``; returns (runtime summary, subscriber)."""
    from rrise.options import make_options
    from rrise.runtime import RunOptions, run_stream

    command = [sys.executable, "-m", "rrise", "subscribe", endpoint, "--count", str(count), "--timeout", "20"]
    with open(received, "w") as out:
        sub = subprocess.Popen(command, stdout=out, stderr=subprocess.PIPE, text=True)
        try:
            options = make_options(
                RunOptions, publish=endpoint, wait_subscribers=1, wait_timeout=20.0, backend="onnxruntime"
            )
            summary = run_stream(bundle, str(video), options)
            _, err = sub.communicate(timeout=60)
        finally:
            if sub.poll() is None:
                sub.kill()
    return summary, sub.returncode, err


def stage_runtime_demo(w: Workdir) -> dict[str, Any]:
    """Stream a video of test images through the runtime, publish on ZeroMQ, read it elsewhere."""
    ds, p = w.data("test"), w.prof
    idx = w.splits()["test"][: p.video_frames]
    video = write_demo_video(w.path("demo_video.avi"), ds.images[idx])
    endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    received_path = w.path("received.jsonl")
    summary, code, err = _stream_to_subscriber(w.path("bundle"), video, endpoint, len(idx), received_path)
    records = [json.loads(line) for line in received_path.read_text().splitlines() if line.strip()]
    if code != 0 and not records:
        raise RuntimeError(f"the subscriber failed: {(err or '').strip()}")
    correct = sum(1 for r, i in zip(records, idx) if r["pred"] == int(ds.labels[i]))
    return {
        "video": str(video),
        "endpoint": endpoint,
        "summary": summary,
        "records": records,
        "received": len(records),
        "sent": summary.get("frames"),
        "correct": correct,
    }


def adaptive_summary_rows(section: dict[str, Any] | None, budget: int = ROUTING_BUDGET) -> dict[str, Any]:
    """Three rows of the evaluation's adaptive section for the demo's summary, on the same test
    inputs: the surrogate alone, the routed mode at the budget closest to ``budget`` (where no routed
    row ran, the required-radius row at :data:`DEMO_REQUIRED_RADIUS`; its ``setting`` says which)
    and Cohen; {} without the section."""
    rows = list((section or {}).get("rows", {}).values())
    routed = sorted(
        (r for r in rows if r["kind"] == KIND_ADAPTIVE), key=lambda r: abs(r["mc_budget"] - budget)
    )
    required = [r for r in rows if r["kind"] == KIND_REQUIRED]
    required.sort(key=lambda r: r["require_radius"] != DEMO_REQUIRED_RADIUS)
    out: dict[str, Any] = {}
    for row in (r for r in rows if r["kind"] == KIND_SURROGATE):
        out["RRISE alone"] = row
    if routed:
        out["Adaptive"] = {**routed[0], "setting": f"budget {routed[0]['mc_budget']}, routed by the rule"}
    elif required:
        r = required[0]
        out["Adaptive"] = {
            **r,
            "setting": f"budget {r['mc_budget']}, --require-radius {r['require_radius']:g}",
        }
    for row in (r for r in rows if r["kind"] == KIND_COHEN):
        out["Cohen MC"] = row
    return out


def run_adaptive_demo(w: Workdir, video: Path) -> dict[str, Any]:
    """The demo video through the runtime once in adaptive mode: the bundle's routing rule at its
    budget, or, where it states none, ``--require-radius`` :data:`DEMO_REQUIRED_RADIUS` at
    :data:`ROUTING_BUDGET` draws; at Cohen's level (the profile's ``mc_alpha``)."""
    from rrise import Bundle
    from rrise.runtime import Runtime

    bundle = Bundle.load(w.path("bundle"))
    rule = (bundle.manifest.get("adaptive") or {}).get("routing")
    budget = int(rule.get("mc_budget") or ROUTING_BUDGET) if rule else ROUTING_BUDGET
    require = None if rule else DEMO_REQUIRED_RADIUS
    t0 = time.perf_counter()
    mc = {"mc_budget": budget, "mc_batch": min(DEFAULT_MC_BATCH, budget), "mc_alpha": w.prof.mc_alpha}
    with Runtime(bundle, backend="onnxruntime", require_radius=require, **mc) as runtime:
        records = [r for r in runtime.stream(str(video)) if r.get("kind") != "status"]
    draws = [int(r["mc_draws"]) for r in records]
    return {
        "mc_budget": budget,
        "routing": "the bundle's rule" if rule else f"--require-radius {require:g}",
        "frames": len(records),
        "mc_frames": sum(d > 0 for d in draws),
        "mc_draws": sum(draws),
        "certified_by": {k: sum(r["certified_by"] == k for r in records) for k in ("surrogate", "mc")},
        "abstained": sum(bool(r["abstain"]) for r in records),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def run_demo(w: Workdir, force: bool = False) -> dict[str, Any]:
    """Every stage in order (each skipped when current, rerun when stale), then the runtime on a
    video (once publishing, once in adaptive mode); returns the metrics, the received records and
    the summary's adaptive rows (:func:`adaptive_summary_rows`). Optional stages run before (`rrise
    reference`) are brought up to date too, so that the report never mixes models."""

    optional = [n for n in OPTIONAL_STAGES if read_record(w.root, n) is not None]
    for name in STAGES:
        if name == "evaluate":
            for extra in optional:
                run_stage(w, extra, force=force)
        run_stage(w, name, force=force)
    t0 = time.perf_counter()
    stream = stage_runtime_demo(w)
    w.record_seconds("runtime", time.perf_counter() - t0)
    stream["adaptive"] = run_adaptive_demo(w, Path(stream["video"]))
    w.record_seconds("runtime (adaptive)", stream["adaptive"]["seconds"])
    metrics = read_json(w.path("report/metrics.json"))
    metrics["stage_seconds"] = w.stage_seconds()
    return {"metrics": metrics, "stream": stream, "adaptive": adaptive_summary_rows(metrics.get("adaptive"))}
