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
from rrise.records import ADAPTIVE_KEYS, RECORD_KEYS, STATUS_ADAPTIVE_KEYS
from rrise.runtime.foxglove_channels import (
    ADAPTIVE_PREDICTION_SCHEMA,
    PREDICTION_SCHEMA,
    STATUS_SCHEMA,
    label_text,
)
from rrise.runtime.recording_reader import McapReader, Ros2BagReader
from rrise.runtime.ros2_msgs import (
    CERTIFIED_PREDICTION,
    CERTIFIED_PREDICTION_MSG,
    ONE_PASS_DRAWS,
    prediction_message,
    record_from_prediction,
    typestore,
)
from tests.recording_fixtures import colour_frames, record_run, stamps
from tests.runtime_fixtures import make_bundle

N = 12
BAD = 5  # this frame is unreadable: an error record, and no image message
# adaptive mode: draws on every frame whose surrogate radius is below 0.3 (the test bundle's base
# model is its surrogate, so Monte Carlo certifies some of them)
ADAPTIVE = {"mc_budget": 1024, "require_radius": 0.3}


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


@pytest.fixture(scope="module")
def adaptive_foxglove_run(bundle: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("fox_mc")
    path = out / "run.mcap"
    records, _ = record_run(bundle, out, _frames(), record=str(path), status_interval=1e-4, **ADAPTIVE)
    return path, records


@pytest.fixture(scope="module")
def adaptive_ros2_run(bundle: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("ros_mc")
    path = out / "run_bag"
    records, _ = record_run(bundle, out, _frames(), record=str(path), record_format="ros2", **ADAPTIVE)
    return path, records


def _mcap_messages(path: Path) -> tuple[dict[str, dict], dict[str, list]]:
    """The JSON schema and the decoded messages of each topic of a Foxglove MCAP file."""
    with open(path, "rb") as f:
        reader = make_reader(f)
        summary = reader.get_summary()
        schemas = {
            ch.topic: json.loads(summary.schemas[ch.schema_id].data)
            for ch in summary.channels.values()
            if summary.schemas[ch.schema_id].encoding == "jsonschema"
        }
        messages: dict[str, list] = {}
        for schema, channel, message in reader.iter_messages():
            decoded = (
                json.loads(message.data)
                if channel.message_encoding == "json"
                else _protobuf_class(schema).FromString(message.data)
            )
            messages.setdefault(channel.topic, []).append(decoded)
    return schemas, messages


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
        assert json.loads(schema.data) == PREDICTION_SCHEMA  # a one-pass run: the schema as before
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


def test_an_adaptive_foxglove_recording_declares_and_carries_who_certified_each_frame(
    adaptive_foxglove_run, foxglove_run
) -> None:
    path, records = adaptive_foxglove_run
    assert all(set(ADAPTIVE_KEYS) <= set(r) for r in records)
    assert any(r["mc_draws"] > 0 for r in records)  # draws were spent below the required radius
    schemas, messages = _mcap_messages(path)
    assert schemas["/rrise/prediction"] == ADAPTIVE_PREDICTION_SCHEMA
    assert list(schemas["/rrise/prediction"]["properties"]) == [*RECORD_KEYS, *ADAPTIVE_KEYS]
    assert set(schemas["/rrise/status"]["properties"]) == {
        *STATUS_SCHEMA["properties"],
        *STATUS_ADAPTIVE_KEYS,
    }
    assert messages["/rrise/prediction"] == records  # every key, the adaptive ones too
    assert all(set(STATUS_ADAPTIVE_KEYS) <= set(s) for s in messages["/rrise/status"])
    labels = [a.texts[0].text for a in messages["/rrise/image/annotations"]]
    shown = [r for r in records if r["error"] is None]
    assert len(labels) == len(shown) == N - 1
    for text, record in zip(labels, shown):
        assert (f"[mc, {record['mc_draws']} draws]" in text) == (record["certified_by"] == "mc")
    # the one-pass recording beside it keeps its schema, and its records have no adaptive key
    one_pass_schemas, one_pass = _mcap_messages(foxglove_run[0])
    assert one_pass_schemas["/rrise/prediction"] == PREDICTION_SCHEMA
    assert not any(set(ADAPTIVE_KEYS) & set(r) for r in one_pass["/rrise/prediction"])
    assert not any("[mc," in a.texts[0].text for a in one_pass["/rrise/image/annotations"])


def test_the_image_label_says_when_monte_carlo_certified_the_frame() -> None:
    record = {"pred": 3, "label": "coat", "abstain": False, "radius": 0.41, "error": None, "alarm": None}
    by_mc = {**record, "certified_by": "mc", "mc_draws": 2048}
    by_surrogate = {**record, "certified_by": "surrogate", "mc_draws": 0, "alarm": "shift"}
    texts = [label_text(r) for r in (record, by_mc, by_surrogate)]
    assert texts == ["coat r=0.410", "coat r=0.410 [mc, 2048 draws]", "coat r=0.410 ALARM shift"]


def test_either_kind_of_recording_replays_its_frames_with_the_existing_readers(
    adaptive_foxglove_run, foxglove_run, adaptive_ros2_run, ros2_run
) -> None:
    for path, reader in (
        (adaptive_foxglove_run[0], McapReader),
        (foxglove_run[0], McapReader),
        (adaptive_ros2_run[0], Ros2BagReader),
        (ros2_run[0], Ros2BagReader),
    ):
        frames = list(reader(path).frames())
        assert [stamp for _, stamp in frames] == [s for i, s in enumerate(stamps(N)) if i != BAD], path
        assert all(frame is not None and frame.shape[:2] == (28, 28) for frame, _ in frames)


def test_a_ros2_prediction_carries_certified_by_and_mc_draws_minus_one_in_a_one_pass_run(
    adaptive_ros2_run, ros2_run
) -> None:
    for (path, records), adaptive in ((adaptive_ros2_run, True), (ros2_run, False)):
        with AnyReader([path]) as reader:  # the bag's own message definitions
            messages = [
                reader.deserialize(raw, c.msgtype)
                for c, _, raw in reader.messages()
                if c.topic == "/rrise/prediction"
            ]
        assert len(messages) == len(records) == N
        for msg, record in zip(messages, records):
            if adaptive:
                assert msg.certified_by == (record["certified_by"] or "")
                assert msg.mc_draws == record["mc_draws"] >= 0
            else:
                assert (msg.certified_by, msg.mc_draws) == ("", ONE_PASS_DRAWS)
            back = record_from_prediction(msg)
            want = [*RECORD_KEYS[:15], *(ADAPTIVE_KEYS if adaptive else ())]
            assert list(back) == want and back == {k: record[k] for k in want}


def test_a_prediction_recorded_before_the_adaptive_fields_reads_back_without_them(ros2_run) -> None:
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    old_msg = "".join(
        line
        for line in CERTIFIED_PREDICTION_MSG.splitlines(keepends=True)
        if not line.startswith(("string certified_by", "int64 mc_draws"))
    )
    store = get_typestore(Stores.ROS2_JAZZY)
    store.register(get_types_from_msg(old_msg, CERTIFIED_PREDICTION))
    fields = {k: v for k, v in prediction_message(ros2_run[1][0]).__dict__.items() if k not in ADAPTIVE_KEYS}
    old = store.types[CERTIFIED_PREDICTION](**fields)
    back = record_from_prediction(
        store.deserialize_cdr(store.serialize_cdr(old, CERTIFIED_PREDICTION), CERTIFIED_PREDICTION)
    )
    assert list(back) == list(RECORD_KEYS[:15])


def test_the_ros2_package_ships_the_message_the_runtime_encodes() -> None:
    msg_file = Path(__file__).parents[2] / "ros2" / "rrise_msgs" / "msg" / "CertifiedPrediction.msg"
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
