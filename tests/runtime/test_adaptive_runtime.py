"""Adaptive certification in the runtime (``rrise run --mc-budget N``): records, routing, budget,
deadline, refusals, counts, and the one-pass mode left byte for byte as it was."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from rrise.bundle import ADAPTIVE_GUARANTEE, GUARANTEE, Bundle, bundle_guarantee, write_manifest
from rrise.certificate import Certificate
from rrise.cli import app
from rrise.inspect import format_inspection, inspect_bundle
from rrise.manifest_schema import ManifestError, validate_manifest
from rrise.records import (
    ADAPTIVE_KEYS,
    RECORD_KEYS,
    STATUS_ADAPTIVE_KEYS,
    Record,
    Verdict,
    pack,
    unpack,
    unpack_status,
)
from rrise.runtime import Runtime, run_stream
from rrise.runtime.adaptive import McCertifier, McOptions, McRefused
from rrise.runtime.options import RunOptions, StreamOptions
from rrise.runtime.runner import ADAPTIVE_SUMMARY_KEYS, SUMMARY_KEYS
from rrise.runtime.sources import PushSource
from rrise.sequential import SequentialOptions, largest_certifiable_radius
from tests.tiny_bundle import linear_sources, make_linear_bundle

# Payloads packed by the runtime before adaptive mode existed (same verdicts, stamps and bundle id).
ONE_PASS_PAYLOADS = [
    "de0010a17601a373657100a56672616d6500a87374616d705f6e73cf17979cfe362a0000a6736f75726365a863616d6572613a30"
    "a47072656402a56c6162656ca163a76162737461696ec2a6726164697573cb3fdc000000000000a573636f7265cb3fef000000000000"
    "a7705f6c6f776572cb3fee000000000000aa6c6174656e63795f6d73cb0000000000000000a662756e646c65b030313233343536373839"
    "616263646566a56572726f72c0a5616c61726dc0a56f6f645f70c0",
    "de0010a17601a373657101a56672616d6507a87374616d705f6e73cf17979cfe362a0001a6736f75726365a863616d6572613a30"
    "a470726564c0a56c6162656cc0a76162737461696ec3a6726164697573cb0000000000000000a573636f7265cb3fe0000000000000"
    "a7705f6c6f776572cb3fd0000000000000aa6c6174656e63795f6d73cb3ff8000000000000a662756e646c65b030313233343536373839"
    "616263646566a56572726f72c0a5616c61726da57368696674a56f6f645f70cb3fc0000000000000",
    "de0010a17601a373657102a56672616d6508a87374616d705f6e73cf17979cfe362a0002a6736f75726365a863616d6572613a30"
    "a470726564c0a56c6162656cc0a76162737461696ec3a6726164697573cb0000000000000000a573636f7265c0a7705f6c6f776572c0"
    "aa6c6174656e63795f6d73cb4008000000000000a662756e646c65b030313233343536373839616263646566a56572726f72b06261642"
    "06672616d653a20656d707479a5616c61726da96f6f642b7368696674a56f6f645f70c0",
]
VERDICTS = [
    Verdict(
        0,
        0,
        Certificate(top_class=2, abstain=False, radius=0.4375, score=0.96875, p_lower=0.9375),
        "c",
        None,
        None,
        None,
    ),
    Verdict(
        1,
        7,
        Certificate(top_class=1, abstain=True, radius=0.0, score=0.5, p_lower=0.25),
        None,
        None,
        "shift",
        0.125,
    ),
    Verdict(2, 8, None, None, "bad frame: empty", "ood+shift", None),
]


def _one_pass_payload(i: int, verdict: Verdict) -> bytes:
    record = Record.of(
        verdict,
        stamp_ns=1_700_000_000_000_000_000 + i,
        latency_ms=1.5 * i,
        source="camera:0",
        bundle="0123456789abcdef",
    )
    return pack(record.to_dict())


def test_one_pass_records_are_byte_for_byte_those_of_the_runtime_before_adaptive_mode():
    for i, verdict in enumerate(VERDICTS):
        assert _one_pass_payload(i, verdict).hex() == ONE_PASS_PAYLOADS[i]


@pytest.fixture(scope="module")
def linear(tmp_path_factory):
    folder = tmp_path_factory.mktemp("linear")
    return make_linear_bundle(linear_sources(folder), folder / "bundle").path


def _frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (4, 4), dtype=np.uint8) for _ in range(n)]


def test_budget_zero_runtime_records_have_exactly_the_one_pass_keys(linear):
    with Runtime(linear, backend="onnxruntime", mc_budget=0) as plain:
        records = plain.certify_batch(_frames(6), stamp_ns=1)
    with Runtime(linear, backend="onnxruntime") as before:
        same = before.certify_batch(_frames(6), stamp_ns=1)
    assert plain.adaptive is None
    for got, ref in zip(records, same):
        assert tuple(got) == RECORD_KEYS and not set(ADAPTIVE_KEYS) & set(got)
        got.pop("latency_ms"), ref.pop("latency_ms")
        assert pack(got) == pack(ref)


# --- adaptive mode on the tiny digits bundle (which carries its base model) ---------------------------
BUDGET, BATCH = 1024, 128


def _digit_frames(tiny_bundle) -> list[np.ndarray]:
    frames = sorted((tiny_bundle.parent / "frames").glob("*.png"))
    return [cv2.imread(str(f), cv2.IMREAD_GRAYSCALE) for f in frames if cv2.imread(str(f)) is not None]


def test_records_with_the_mode_on_carry_its_keys_and_spend_draws_only_below_the_required_radius(tiny_bundle):
    frames = _digit_frames(tiny_bundle)
    with Runtime(tiny_bundle, backend="onnxruntime") as plain:
        surrogate = [v.certificate for v in plain.certify_frames(frames)]
    radii = sorted(0.0 if c.abstain else c.radius for c in surrogate)
    require = float(np.clip(np.median(radii), 0.05, 0.5))
    with Runtime(
        tiny_bundle, backend="onnxruntime", mc_budget=BUDGET, mc_batch=BATCH, require_radius=require
    ) as rt:
        records = rt.certify_batch(frames + [None])
    assert all(tuple(r)[: len(RECORD_KEYS)] == RECORD_KEYS and set(ADAPTIVE_KEYS) <= set(r) for r in records)
    assert records[-1]["error"] and records[-1]["certified_by"] is None and records[-1]["mc_draws"] == 0
    for cert, record in zip(surrogate, records):
        unpack(pack(record))  # a valid record, adaptive keys included
        r_s = 0.0 if cert.abstain else cert.radius
        assert 0 <= record["mc_draws"] <= BUDGET
        assert (record["mc_draws"] > 0) == (r_s < require)
        assert record["radius"] >= r_s and record["score"] == pytest.approx(cert.score)
        assert record["pred"] in (None, cert.top_class)  # never a class other than Â
        want = None if record["abstain"] else ("mc" if record["radius"] > r_s else "surrogate")
        assert record["certified_by"] == want


class _Votes:
    """A base model that votes ``vote(x)`` for every draw and advances a fake clock per batch."""

    def __init__(self, vote, batch_ms: float = 0.0):
        self.vote, self.batch_ms, self.now, self.calls = vote, batch_ms, 0.0, 0

    def __call__(self, x):
        self.calls += 1
        self.now += self.batch_ms / 1000.0
        return np.full(len(x), self.vote, dtype=np.int64)

    def clock(self):
        return self.now


def _abstaining_frame(runtime: Runtime) -> tuple[np.ndarray, Certificate]:
    for frame in _frames(200, seed=3):
        cert = runtime.certify_frames([frame])[0].certificate
        if cert.abstain:
            return frame, cert
    raise AssertionError("no abstaining frame")


@pytest.mark.parametrize("agrees", [True, False])
def test_a_frame_the_surrogate_abstains_on_is_certified_by_mc_for_its_class_only(linear, agrees):
    with Runtime(linear, backend="onnxruntime") as plain:
        frame, cert = _abstaining_frame(plain)
    votes = _Votes(cert.top_class if agrees else (cert.top_class + 1) % 3)
    mc = McCertifier(
        votes, 0.25, SequentialOptions(budget=2048, batch_size=256), num_classes=3, require_radius=0.3
    )
    with Runtime(linear, backend="onnxruntime", mc=mc) as rt:
        record = rt.certify(frame)
    assert record["mc_draws"] > 0 and record["score"] == pytest.approx(cert.score)
    if agrees:
        assert record["certified_by"] == "mc" and record["pred"] == cert.top_class and not record["abstain"]
        assert (
            record["radius"] >= 0.3 and record["p_lower"] > 0.5 and record["label"] == "abc"[cert.top_class]
        )
    else:  # every draw voted for another class: the record still abstains, no other class is certified
        assert record["certified_by"] is None and record["abstain"] and record["pred"] is None


def test_the_deadline_bounds_a_whole_batch_of_frames_with_an_injected_clock(linear):
    with Runtime(linear, backend="onnxruntime") as plain:
        frame, cert = _abstaining_frame(plain)
    votes = _Votes(cert.top_class, batch_ms=10.0)
    options = SequentialOptions(budget=64 * 32, batch_size=32, deadline_ms=25.0)
    mc = McCertifier(votes, 0.25, options, num_classes=3, require_radius=0.6, clock=votes.clock)
    with Runtime(linear, backend="onnxruntime", mc=mc) as rt:
        records = rt.certify_batch([frame] * 5)
    assert 1000.0 * votes.now <= 25.0 + 10.0  # the deadline plus one batch, for all five frames
    assert records[0]["mc_draws"] > 0 and sum(r["mc_draws"] for r in records) == 32 * votes.calls
    assert all(r["mc_draws"] == 0 for r in records[1:])  # nothing left of the deadline for them


def test_the_bundle_routing_rule_decides_without_a_required_radius(linear, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(linear, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    rule = {"score_below": 0.9, "target_radius": 0.3, "chosen_on": "selection split", "mc_budget": 1024}
    manifest["adaptive"] = {"routing": rule}
    write_manifest(copy, manifest)
    frames = _frames(40)
    with Runtime(copy, backend="onnxruntime") as plain:
        surrogate = [v.certificate for v in plain.certify_frames(frames)]
    with Runtime(copy, backend="onnxruntime", mc_budget=1024) as rt:
        records = rt.certify_batch(frames)
        assert rt.adaptive.routing.origin == "bundle adaptive.routing"
    routed = [(0.0 if c.abstain else c.radius) < 0.3 and c.score < 0.9 for c in surrogate]
    assert any(routed) and not all(routed)
    assert [r["mc_draws"] > 0 for r in records] == routed
    manifest["adaptive"]["routing"]["target_radius"] = 0
    with pytest.raises(ManifestError, match="adaptive.routing.target_radius"):
        validate_manifest(manifest)


def test_the_bundle_stopping_rule_is_what_the_runtime_runs(linear, tmp_path):
    """manifest adaptive.sequential (the prior, futility level and first batch the routing rule was
    chosen with) reaches the runtime's sequential test; a value out of range or a rule this version
    does not run is refused by name; a bundle without it runs the defaults."""
    from rrise.sequential import DEFAULT_PRIOR, SequentialOptions, stated_stopping

    copy = tmp_path / "bundle"
    shutil.copytree(linear, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    rule = {"score_below": None, "target_radius": 0.3, "chosen_on": "selection split", "mc_budget": 1024}
    stated = stated_stopping(
        SequentialOptions(budget=1024, prior=(2.0, 0.5), futility_alpha=0.05, first_batch=32)
    )
    manifest["adaptive"] = {"routing": rule, "sequential": stated}
    write_manifest(copy, manifest)
    with Runtime(copy, backend="onnxruntime", mc_budget=1024) as rt:
        options = rt.adaptive.mc.options
        assert (options.prior, options.futility_alpha, options.first_batch) == ((2.0, 0.5), 0.05, 32)
        records = rt.certify_batch(_frames(20))
    assert all(r["mc_draws"] in (0, 32) or r["mc_draws"] >= 96 for r in records)  # 32, then 64, 128, ...
    text = " ".join(format_inspection(*inspect_bundle(copy)).split())  # rrise inspect states it
    assert "beta-binomial mixture bound (prior Beta(2, 0.5)), chernoff projection futility at 0.05" in text
    assert "first batch 32" in text
    for key, bad in (
        ("prior", [1.0, 0.0]),
        ("futility_alpha", 1.5),
        ("first_batch", 0),
        ("bound", "betting"),
    ):
        broken = json.loads(json.dumps(manifest))
        broken["adaptive"]["sequential"][key] = bad
        with pytest.raises(ManifestError, match=f"adaptive.sequential.{key}"):
            validate_manifest(broken)
    del manifest["adaptive"]["sequential"]
    write_manifest(copy, manifest)
    with Runtime(copy, backend="onnxruntime", mc_budget=1024) as rt:
        assert rt.adaptive.mc.options.prior == DEFAULT_PRIOR


def test_a_step_down_rule_in_the_bundle_reaches_the_draws_and_the_statement(linear, tmp_path):
    """A routing rule with step_down: frames whose target is out of reach keep drawing for half of
    it, and rrise run states it."""
    from rrise.runtime.runner import adaptive_statement

    copy = tmp_path / "bundle"
    shutil.copytree(linear, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    rule = {"score_below": None, "target_radius": 0.6, "chosen_on": "selection split", "step_down": True}
    frames = _frames(40)
    draws = {}
    for step_down in (False, True):
        manifest["adaptive"] = {"routing": {**rule, "step_down": step_down}}
        write_manifest(copy, manifest)
        with Runtime(copy, backend="onnxruntime", mc_budget=2048) as rt:
            assert rt.adaptive.routing.step_down is step_down
            draws[step_down] = [r["mc_draws"] for r in rt.certify_batch(frames)]
            stated = adaptive_statement(rt)
        assert ("then half of it" in stated) is step_down
    assert sum(draws[True]) > 2 * sum(draws[False])  # out of reach: most frames step down and draw on
    manifest["adaptive"]["routing"]["step_down"] = "yes"
    with pytest.raises(ManifestError, match="step_down"):
        validate_manifest(manifest)


def test_status_records_and_the_summary_count_mc_frames_draws_and_latency_per_path(linear):
    source = PushSource("robot", live=False)
    for frame in _frames(12):
        source.push(frame)
    source.end()
    got, statuses = [], []
    options = RunOptions(
        stream=StreamOptions(batch=4, status_interval=1e-6), mc=McOptions(mc_budget=1024, require_radius=0.3)
    )
    summary = run_stream(linear, source, options, callback=got.append, on_status=statuses.append)
    draws = [r["mc_draws"] for r in got]
    assert summary["mc_frames"] == sum(d > 0 for d in draws) > 0 and summary["mc_draws"] == sum(draws)
    assert summary["mc_certified"] == sum(r["certified_by"] == "mc" for r in got)
    assert summary["mc_draws_mean"] == pytest.approx(np.mean([d for d in draws if d]))
    assert set(summary["latency_by_path"]) == {"surrogate", "mc"}
    assert summary["latency_by_path"]["mc"]["p99"] >= summary["latency_by_path"]["mc"]["p50"] > 0
    assert set(ADAPTIVE_SUMMARY_KEYS) <= set(summary) and set(SUMMARY_KEYS) <= set(summary)
    assert statuses and all(set(STATUS_ADAPTIVE_KEYS) <= set(unpack_status(pack(s))) for s in statuses)
    assert statuses[-1]["mc_draws"] <= summary["mc_draws"] and "drops" in statuses[-1]
    plain = run_stream(linear, _pushed(_frames(3)), RunOptions(stream=StreamOptions(status_interval=1e-6)))
    assert set(plain) == set(SUMMARY_KEYS)


def _pushed(frames):
    source = PushSource("robot", live=False)
    for frame in frames:
        source.push(frame)
    source.end()
    return source


# --- refusals: one line naming the option, exit 2, no traceback ------------------------------------------
runner = CliRunner()


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("frames")
    for i, frame in enumerate(_frames(4)):
        cv2.imwrite(str(folder / f"{i:03d}.png"), frame)
    return folder


def _run_quietly(bundle: Path, frames_dir: Path, *flags: str):
    """``rrise run`` on the frames with ``--no-output`` and ``flags``; the CLI result."""
    return runner.invoke(
        app, ["run", "--bundle", str(bundle), "--source", str(frames_dir), "--no-output", *flags]
    )


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--mc-budget", "100"], "--mc-budget"),  # below one batch (256)
        (["--mc-budget", "1024", "--require-radius", "5"], "--require-radius"),
        (["--mc-budget", "1024", "--require-radius", "0.3", "--mc-deadline-ms", "-5"], "--mc-deadline-ms"),
        (["--mc-budget", "1024", "--require-radius", "0.3", "--mc-alpha", "1.5"], "--mc-alpha"),
        (["--mc-alpha", "0"], "--mc-alpha"),
        (["--mc-budget", "1024"], "--require-radius"),  # no routing rule in this bundle
        (
            ["--mc-budget", "1024", "--require-radius", "0.3", "--backend", "tensorrt"],
            "--backend onnxruntime",
        ),
    ],
)
def test_rrise_run_refuses_bad_adaptive_options_in_one_line_with_exit_2(linear, frames_dir, flags, named):
    result = _run_quietly(linear, frames_dir, *flags)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and named in lines[-1] and "Traceback" not in result.output


def test_the_largest_certifiable_radius_is_named_when_the_required_one_is_out_of_reach(linear, frames_dir):
    result = _run_quietly(linear, frames_dir, "--mc-budget", "1024", "--require-radius", "5")
    top = largest_certifiable_radius(0.25, SequentialOptions(budget=1024))
    assert f"{top:.4f}" in result.output


def test_a_bundle_without_its_base_model_is_refused_naming_the_option(linear):
    bundle = Bundle.load(linear)
    del bundle.manifest["base_model"]
    with pytest.raises(McRefused, match="--mc-budget needs the bundle's base model"):
        Runtime(bundle, backend="onnxruntime", mc_budget=1024, require_radius=0.3)


def test_rrise_run_with_budget_zero_is_the_one_pass_run(linear, frames_dir, tmp_path):
    outputs = []
    for extra in ([], ["--mc-budget", "0"]):
        out = tmp_path / f"records{len(extra)}.jsonl"
        result = runner.invoke(
            app, ["run", "--bundle", str(linear), "--source", str(frames_dir), "--jsonl", str(out), *extra]
        )
        assert result.exit_code == 0, result.output
        assert "adaptive certification on" not in result.output
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert all(tuple(r) == RECORD_KEYS for r in records)
        outputs.append([{k: v for k, v in r.items() if k not in ("stamp_ns", "latency_ms")} for r in records])
    assert outputs[0] == outputs[1]


def test_rrise_run_states_the_composed_guarantee_when_the_mode_is_on(linear, frames_dir):
    result = _run_quietly(linear, frames_dir, "--mc-budget", "1024", "--require-radius", "0.3")
    assert result.exit_code == 0, result.output
    assert "1 − α − β − A = 0.889 (α = 0.1, β = 0.01, A = 0.001)" in result.output


def test_inspect_shows_the_adaptive_guarantee_and_a_bundle_with_a_rule_states_it(linear, tmp_path):
    summary, problems = inspect_bundle(linear)
    assert not problems and summary["adaptive"] is None
    assert "1 − α − β − A = 0.889" in summary["guarantee_adaptive"]
    text = format_inspection(summary, problems)
    assert "give --require-radius R" in text and "1 − α − β − A" in text
    assert "1 - alpha - beta - A" in bundle_guarantee(adaptive=True) and ADAPTIVE_GUARANTEE not in GUARANTEE


def test_frames_arriving_during_draws_follow_the_drop_policy_and_are_counted(linear):
    def slow(x):  # a base model that takes 20 ms per batch
        time.sleep(0.02)
        return np.zeros(len(x), dtype=np.int64)

    mc = McCertifier(
        slow, 0.25, SequentialOptions(budget=256, batch_size=256), num_classes=3, require_radius=0.3
    )
    source = PushSource("camera", live=True, capacity=2)

    def camera():
        for frame in _frames(40):
            source.push(frame)
            time.sleep(0.002)
        source.end()

    feeder = threading.Thread(target=camera)
    got, statuses = [], []
    with Runtime(linear, backend="onnxruntime", mc=mc) as runtime:
        feeder.start()
        options = RunOptions(stream=StreamOptions(drop_policy="latest", status_interval=0.01))
        summary = run_stream(
            None, source, options, runtime=runtime, callback=got.append, on_status=statuses.append
        )
    feeder.join()
    assert (
        summary["drops"] > 0 and summary["frames"] == len(got) and summary["frames"] + summary["drops"] == 40
    )
    assert summary["mc_frames"] > 0 and statuses and statuses[-1]["drops"] <= summary["drops"]


def test_a_bundle_made_with_a_routing_rule_states_the_composed_guarantee(tmp_path):
    from rrise.export.bundler import BundleSources, pack_bundle

    sources = linear_sources(tmp_path)
    rule = {"score_below": None, "target_radius": 0.25, "chosen_on": "selection split", "mc_budget": 1024}
    bundle = pack_bundle(
        tmp_path / "bundle",
        BundleSources(
            surrogate_onnx=sources["surrogate"],
            base_onnx=sources["base"],
            calibration=sources["cal"],
            calibration_npz=sources["npz"],
            labels=["a", "b", "c"],
            preprocess={"color": "gray", "resize": [4, 4], "interpolation": "area", "layout": "NCHW"},
            dataset="synthetic",
            input_shape=(1, 4, 4),
            adaptive={"routing": rule},
        ),
    )
    assert bundle.manifest["guarantee"] == bundle_guarantee(adaptive=True)
    assert bundle.manifest["adaptive"]["routing"]["target_radius"] == 0.25
    summary, problems = inspect_bundle(bundle.path)
    assert not problems and "1 − α − β − A = 0.889" in summary["guarantee_filled"]
    text = format_inspection(summary, problems)
    assert "draws where the surrogate radius < 0.25 (selection split)" in text
    with Runtime(bundle.path, backend="onnxruntime", mc_budget=1024) as rt:
        assert rt.adaptive.routing.target_radius == 0.25 and rt.adaptive.routing.score_below == float("inf")
