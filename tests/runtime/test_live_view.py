"""rrise run --foxglove: a WebSocket client speaking the Foxglove WebSocket protocol subscribes to a
running stream's channels and receives a frame and its record."""

from __future__ import annotations

import base64
import json
import socket
import struct
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from websockets.sync.client import connect

from rrise.records import ADAPTIVE_KEYS
from rrise.runtime import run_stream
from rrise.runtime.foxglove_channels import ADAPTIVE_PREDICTION_SCHEMA, PREDICTION_SCHEMA
from rrise.runtime.live_view import parse_address
from rrise.runtime.sources import PushSource
from tests.recording_fixtures import colour_frames
from tests.runtime_fixtures import make_bundle, run_options

# The protocol's subprotocol as foxglove-sdk 0.30 serves it (formerly "foxglove.websocket.v1").
SUBPROTOCOL = "foxglove.sdk.v1"
MESSAGE_DATA = 0x01  # binary opcode: subscription id (u32), log time (u64), payload


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _connect(port: int, deadline: float):
    while True:
        try:
            return connect(f"ws://127.0.0.1:{port}", subprotocols=[SUBPROTOCOL], open_timeout=2)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _decoder(channel: dict):
    pool = descriptor_pool.DescriptorPool()
    fds = descriptor_pb2.FileDescriptorSet.FromString(base64.b64decode(channel["schema"]))
    for file in fds.file:
        pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(channel["schemaName"])).FromString


# an adaptive run (draws below radius 0.3; the test bundle's base model is its surrogate) and a one-pass one
MODES = {"adaptive": {"mc_budget": 512, "require_radius": 0.3}, "one-pass": {}}


@pytest.mark.parametrize("mode", list(MODES))
def test_a_foxglove_client_subscribes_and_receives_a_frame_and_its_record(tmp_path: Path, mode: str) -> None:
    bundle = make_bundle(tmp_path / "bundle", color="bgr")
    port = _free_port()
    source = PushSource("camera", live=False, capacity=4)
    result: dict = {}
    options = run_options(foxglove=f"127.0.0.1:{port}", **MODES[mode])
    run = threading.Thread(target=lambda: result.update(run_stream(bundle, source, options)), daemon=True)
    run.start()
    deadline = time.monotonic() + 20
    got: dict[str, object] = {}
    try:
        with _connect(port, deadline) as ws:
            assert ws.subprotocol == SUBPROTOCOL
            channels: dict[str, dict] = {}
            while len(channels) < 3 and time.monotonic() < deadline:
                message = json.loads(ws.recv(timeout=5))
                if message["op"] == "advertise":
                    channels.update({c["topic"]: c for c in message["channels"]})
            image, prediction = channels["/rrise/image/compressed"], channels["/rrise/prediction"]
            assert image["schemaName"] == "foxglove.CompressedImage" and image["encoding"] == "protobuf"
            assert (
                prediction["schemaName"] == "rrise.CertifiedPrediction" and prediction["encoding"] == "json"
            )
            declared = json.loads(prediction["schema"])  # the adaptive keys only in an adaptive run
            assert declared == (ADAPTIVE_PREDICTION_SCHEMA if mode == "adaptive" else PREDICTION_SCHEMA)
            subs = [{"id": 1, "channelId": image["id"]}, {"id": 2, "channelId": prediction["id"]}]
            ws.send(json.dumps({"op": "subscribe", "subscriptions": subs}))
            frames = iter(colour_frames(1000))
            while len(got) < 2 and time.monotonic() < deadline:
                source.push(next(frames))  # frames keep coming until the client has both
                try:
                    data = ws.recv(timeout=0.2)
                except TimeoutError:
                    continue
                if isinstance(data, bytes) and data[0] == MESSAGE_DATA:
                    sub, log_time = struct.unpack_from("<IQ", data, 1)
                    got[{1: "image", 2: "record"}[sub]] = (log_time, data[13:])
    finally:
        source.end()
        run.join(20)
    assert not run.is_alive() and result["frames"] >= 1
    assert set(got) == {"image", "record"}
    log_time, payload = got["record"]
    record = json.loads(payload)
    assert record["stamp_ns"] == log_time and record["source"] == "camera" and "radius" in record
    assert (set(ADAPTIVE_KEYS) <= set(record)) == (mode == "adaptive")
    log_time, payload = got["image"]
    image_msg = _decoder(image)(payload)
    assert (
        image_msg.format == "jpeg"
        and image_msg.timestamp.seconds * 10**9 + image_msg.timestamp.nanos == log_time
    )
    assert cv2.imdecode(np.frombuffer(image_msg.data, np.uint8), cv2.IMREAD_COLOR).shape == (28, 28, 3)


@pytest.mark.parametrize(
    "spec, expected",
    [("0.0.0.0:9000", ("0.0.0.0", 9000)), (":9001", ("127.0.0.1", 9001)), ("9002", ("127.0.0.1", 9002))],
)
def test_live_view_address_forms(spec: str, expected: tuple[str, int]) -> None:
    assert parse_address(spec) == expected


def test_a_bad_live_view_address_names_the_option() -> None:
    with pytest.raises(ValueError, match="--foxglove"):
        parse_address("host:port")


@pytest.mark.parametrize("host, warned", [("0.0.0.0", True), ("127.0.0.1", False)])
def test_serving_every_interface_is_warned(host: str, warned: bool, caplog: pytest.LogCaptureFixture) -> None:
    """A live view on every interface hands every frame to anyone on the network (the protocol has
    no authentication): said, as publishing on tcp://* without CURVE is."""
    from rrise.runtime.live_view import FoxgloveLiveView

    with caplog.at_level("WARNING", logger="rrise.runtime"):
        view = FoxgloveLiveView(f"{host}:0")
        view.close()
    assert any("every interface" in r.getMessage() for r in caplog.records) == warned
