"""rrise run --record: a run recorded as a Foxglove MCAP file and as a ROS 2 bag, each read back
with an independent reader (the ``mcap`` library with protobuf's own decoder; ``rosbags``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from mcap.reader import make_reader
from rosbags.highlevel import AnyReader
from typer.testing import CliRunner

from rrise.cli import app
from rrise.records import RECORD_KEYS
from rrise.runtime.ros2_msgs import (
    CERTIFIED_PREDICTION,
    CERTIFIED_PREDICTION_MSG,
    prediction_message,
    record_from_prediction,
    typestore,
)
from tests.recording_fixtures import colour_frames, record_run, stamps
from tests.runtime_fixtures import make_bundle

N = 12
BAD = 5  # this frame is unreadable: an error record, and no image message


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("rec") / "bundle", color="bgr")


def _frames() -> list[np.ndarray | None]:
    frames: list[np.ndarray | None] = list(colour_frames(N))
    frames[BAD] = None
    return frames


@pytest.fixture(scope="module")
def foxglove_run(bundle: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("fox")
    records, summary = record_run(bundle, out, _frames(), record=str(out / "run.mcap"), status_interval=1e-4)
    return out / "run.mcap", records, summary


@pytest.fixture(scope="module")
def ros2_run(bundle: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("ros")
    records, _ = record_run(
        bundle, out, _frames(), record=str(out / "run_bag"), record_format="ros2", status_interval=1e-4
    )
    return out / "run_bag", records


def _protobuf_class(schema):
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(schema.data).file:
        pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(schema.name))


def test_foxglove_mcap_holds_every_frame_and_record_at_its_capture_time(foxglove_run) -> None:
    path, records, summary = foxglove_run
    assert summary["frames"] == N and summary["errors"] == 1
    with open(path, "rb") as f:
        reader = make_reader(f)
        summary_section = reader.get_summary()
        channels = {ch.topic: ch for ch in summary_section.channels.values()}
        kinds = {
            t: (ch.message_encoding, summary_section.schemas[ch.schema_id].name) for t, ch in channels.items()
        }
        assert kinds == {
            "/rrise/image/compressed": ("protobuf", "foxglove.CompressedImage"),
            "/rrise/image/annotations": ("protobuf", "foxglove.ImageAnnotations"),
            "/rrise/prediction": ("json", "rrise.CertifiedPrediction"),
            "/rrise/status": ("json", "rrise.Status"),
        }
        schema = summary_section.schemas[channels["/rrise/prediction"].schema_id]
        assert schema.encoding == "jsonschema" and set(json.loads(schema.data)["properties"]) == set(
            RECORD_KEYS
        )
        images, predictions, statuses = [], [], []
        for schema, channel, message in reader.iter_messages():
            if channel.topic == "/rrise/image/compressed":
                images.append((message.log_time, _protobuf_class(schema).FromString(message.data)))
            elif channel.topic == "/rrise/prediction":
                predictions.append((message.log_time, json.loads(message.data)))
            elif channel.topic == "/rrise/status":
                statuses.append(json.loads(message.data))
        metadata = {m.name: m.metadata for m in reader.iter_metadata()}
    assert [p for _, p in predictions] == records  # every field, as the JSON-lines sink wrote it
    assert [t for t, _ in predictions] == stamps(N) == [r["stamp_ns"] for r in records]
    assert len(images) == N - 1  # the unreadable frame has a record and no image
    assert [t for t, _ in images] == [s for i, s in enumerate(stamps(N)) if i != BAD]
    first = images[0][1]
    assert first.format == "jpeg" and first.timestamp.seconds * 10**9 + first.timestamp.nanos == stamps(N)[0]
    decoded = cv2.imdecode(np.frombuffer(first.data, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (28, 28, 3)
    assert predictions[BAD][1]["error"] and predictions[BAD][1]["pred"] is None
    assert statuses and statuses[-1]["kind"] == "status" and statuses[-1]["frames"] <= N
    assert metadata["rrise"]["bundle"] == records[0]["bundle"] and metadata["rrise"]["frames"] == str(N - 1)


def test_ros2_bag_is_cdr_that_rosbags_reads_back_to_the_same_records(ros2_run) -> None:
    path, records = ros2_run
    assert (path / "metadata.yaml").is_file()
    images, predictions, diagnostics = [], [], []
    with AnyReader([path]) as reader:  # the bag's own message definitions, not ours
        types = {c.topic: c.msgtype for c in reader.connections}
        assert types == {
            "/rrise/image/compressed": "sensor_msgs/msg/CompressedImage",
            "/rrise/prediction": "rrise_msgs/msg/CertifiedPrediction",
            "/diagnostics": "diagnostic_msgs/msg/DiagnosticArray",
        }
        for connection, log_time, raw in reader.messages():
            msg = reader.deserialize(raw, connection.msgtype)
            if connection.topic == "/rrise/image/compressed":
                images.append((log_time, msg))
            elif connection.topic == "/rrise/prediction":
                predictions.append((log_time, msg))
            else:
                diagnostics.append(msg.status[0])
    assert diagnostics and diagnostics[-1].name == "rrise" and "fps" in diagnostics[-1].message
    assert {kv.key for kv in diagnostics[-1].values} >= {"fps", "drops", "abstain_rate", "alarm"}
    assert len(images) == N - 1 and len(predictions) == N
    assert [t for t, _ in predictions] == stamps(N)
    for (log_time, msg), record in zip(predictions, records):
        assert msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec == log_time == record["stamp_ns"]
        assert msg.class_id == (-1 if record["pred"] is None else record["pred"])
        assert msg.label == (record["label"] or "") and msg.abstain == record["abstain"]
        assert msg.radius == pytest.approx(record["radius"]) and msg.bundle_id == record["bundle"]
        assert msg.error == (record["error"] or "") and msg.source == record["source"]
    assert images[0][1].format == "jpeg"
    assert cv2.imdecode(images[0][1].data, cv2.IMREAD_COLOR).shape == (28, 28, 3)


def test_a_prediction_message_round_trips_the_record_fields_it_carries(ros2_run) -> None:
    _, records = ros2_run
    store = typestore()
    for record in records:
        raw = store.serialize_cdr(prediction_message(record), CERTIFIED_PREDICTION)
        back = record_from_prediction(store.deserialize_cdr(raw, CERTIFIED_PREDICTION))
        assert set(back) == set(RECORD_KEYS[:15])  # DESIGN §3's keys; later additions stay in JSON
        assert back == {k: record[k] for k in back}


def test_the_ros2_package_ships_the_message_the_runtime_encodes() -> None:
    msg_file = Path(__file__).parents[1] / "ros2" / "rrise_msgs" / "msg" / "CertifiedPrediction.msg"
    assert msg_file.read_text() == CERTIFIED_PREDICTION_MSG


def test_record_refuses_to_overwrite_and_a_bag_named_like_a_file(bundle: Path, tmp_path: Path) -> None:
    video = tmp_path / "v.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (28, 28))
    for frame in colour_frames(3):
        writer.write(frame)
    writer.release()
    (tmp_path / "taken.mcap").write_bytes(b"keep me")
    base = ["run", "--bundle", str(bundle), "--source", str(video)]
    cases = [
        (["--record", str(tmp_path / "taken.mcap")], "exists already"),
        (["--record", str(tmp_path / "bag.mcap"), "--record-format", "ros2"], "a ROS 2 bag is a folder"),
        (["--record", str(tmp_path / "run.txt")], "ending in .mcap"),
    ]
    for extra, said in cases:
        done = CliRunner().invoke(app, base + extra)
        assert done.exit_code == 1, done.output
        assert said in " ".join(done.output.split()) and "Traceback" not in done.output
    assert (tmp_path / "taken.mcap").read_bytes() == b"keep me"
    assert not (tmp_path / "bag.mcap").exists() and not (tmp_path / "run.txt").exists()


@pytest.mark.parametrize(
    "module, extra_args, package",
    [
        ("foxglove", ["--record", "run.mcap"], "foxglove-sdk"),
        ("rosbags.rosbag2", ["--record", "run_bag", "--record-format", "ros2"], "rosbags"),
        ("foxglove", ["--foxglove", "127.0.0.1:0"], "foxglove-sdk"),
    ],
)
def test_without_the_robotics_extra_the_option_says_what_to_install(
    bundle: Path, tmp_path: Path, monkeypatch, module: str, extra_args: list[str], package: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # as if the package were not installed
    monkeypatch.chdir(tmp_path)
    (tmp_path / "frames").mkdir()
    cv2.imwrite(str(tmp_path / "frames" / "a.png"), colour_frames(1)[0])
    args = ["run", "--bundle", str(bundle), "--source", "frames", *extra_args]
    done = CliRunner().invoke(app, args)
    said = " ".join(done.output.split())
    assert done.exit_code == 1 and package in said and "pip install 'rrise[robotics]'" in said
    assert not (tmp_path / "run.mcap").exists() and not (tmp_path / "run_bag").exists()
