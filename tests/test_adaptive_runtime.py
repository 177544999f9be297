"""Adaptive certification in the runtime (``rrise run --mc-budget N``): records, routing, budget,
deadline, refusals, counts, and the one-pass mode left byte for byte as it was."""

from __future__ import annotations

import numpy as np
import pytest

from rrise.certificate import Certificate
from rrise.records import ADAPTIVE_KEYS, RECORD_KEYS, Record, Verdict, pack
from rrise.runtime import Runtime
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
