"""The whole pipeline end to end: digits through the CLI, and real Fashion-MNIST in-process."""

import json

import numpy as np
import pytest
from scipy.stats import norm
from typer.testing import CliRunner

from rrise import Bundle
from rrise.cli import app
from tests.conftest import FASHION_AVAILABLE

runner = CliRunner()


def test_demo_on_digits_writes_every_output_and_streams_records(tmp_path):
    work = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--workdir", str(work), "--dataset", "digits", "--no-progress"])
    assert result.exit_code == 0, result.output
    for name in [
        "base.pt",
        "base.onnx",
        "bundle/manifest.json",
        "report/metrics.json",
        "report/report.md",
        "report/certified_accuracy.png",
    ]:
        assert (work / name).is_file(), name
    metrics = json.loads((work / "report/metrics.json").read_text())
    methods = metrics["methods"]
    assert any(k.startswith("RRISE") for k in methods) and any(k.startswith("Cohen") for k in methods)
    for m in methods.values():
        ca = m["certified_accuracy"]
        assert all(a >= b for a, b in zip(ca, ca[1:])), "certified accuracy must not grow with the radius"
        assert m["per_query_s"] > 0
    assert "Certified accuracy" in result.output and "r = 0.75" in result.output
    assert "records received" in result.output
    received = (work / "received.jsonl").read_text().splitlines()
    assert len(received) == 12
    Bundle.load(work / "bundle")

    # Every stage resumes: a second run skips everything up to the runtime.
    again = runner.invoke(app, ["demo", "--workdir", str(work), "--no-progress"])
    assert again.exit_code == 0, again.output
    from rrise.calibrate.pipeline import STAGES

    assert again.output.count("skipping") == len(STAGES)

    # Calibration rules from the CLI: bins need only the selection split's ŝ; a score map needs its
    # full-size MC, which the digits profile does not sample, and says so.
    assert json.loads((work / "rules.json").read_text())["winner"] == "single"
    binned = runner.invoke(app, ["calibrate", "--workdir", str(work), "--rule", "bins", "--bins", "2"])
    assert binned.exit_code == 0, binned.output
    record = json.loads((work / "calibration.json").read_text())
    assert record["rule"] == "bins" and len(record["bin_edges"]) == 1 and len(record["bin_quantiles"]) == 2
    mapped = runner.invoke(app, ["calibrate", "--workdir", str(work), "--rule", "map"])
    assert mapped.exit_code == 1 and "full-size MC counts on the selection split" in mapped.output

    # A high-budget reference replaces Cohen's draws as the violation reference, on its inputs only.
    assert runner.invoke(app, ["reference", "--workdir", str(work), "--no-progress"]).exit_code == 0
    assert runner.invoke(app, ["evaluate", "--workdir", str(work), "--force", "--no-progress"]).exit_code == 0
    metrics = json.loads((work / "report/metrics.json").read_text())
    rrise = next(v for k, v in metrics["methods"].items() if k.startswith("RRISE"))
    v = rrise["violations"]
    assert v["n_ref"] == 5000 and v["certified"] <= 30
    assert v["against Cohen's estimation draws on every test input"]["n_ref"] == 200
    assert "5000 fresh MC draws on each of 30 test inputs" in metrics["violation_note"]


def test_workdir_refuses_another_configuration(tmp_path):
    work = tmp_path / "w"
    runner.invoke(app, ["train-base", "--workdir", str(work), "--dataset", "digits", "--no-progress"])
    result = runner.invoke(app, ["targets", "--workdir", str(work), "--sigma", "0.5"])
    assert result.exit_code == 1 and "sigma" in result.output


@pytest.mark.integration
@pytest.mark.skipif(not FASHION_AVAILABLE, reason="Fashion-MNIST is not installed")
def test_fashion_mnist_pipeline_is_disjoint_and_calibrated(tmp_path):
    from rrise.calibrate.pipeline import STAGES, RunConfig, Workdir, run_stage
    from rrise.calibrate.rules import get_rule

    w = Workdir.open(
        tmp_path / "fm", RunConfig(dataset="fashion-mnist", profile="smoke"), show_progress=False
    )
    sp = w.splits()
    assert not set(sp["base"]) & set(sp["calibration"])
    assert not set(sp["selection"]) & set(sp["calibration"])
    assert not set(sp["base"]) & set(sp["selection"])
    for name in STAGES:
        run_stage(w, name)
    metrics = json.loads(w.path("report/metrics.json").read_text())
    rrise = next(v for k, v in metrics["methods"].items() if k.startswith("RRISE"))
    cohen = next(v for k, v in metrics["methods"].items() if k.startswith("Cohen"))
    # not vacuous: smoke-sized models on 60 test inputs certify 55–60% at r = 0 (RRISE) and 77% (Cohen)
    assert rrise["certified_accuracy"][0] > 0.3 and cohen["certified_accuracy"][0] > 0.5
    cal = np.load(w.path("calibration.npz"))
    assert (cal["counts"].sum(1) == w.prof.n_cal).all()
    b = Bundle.load(w.path("bundle"))
    assert (
        b.manifest["calibration"]["m"] == w.prof.m and b.manifest["calibration"]["dataset"] == "fashion-mnist"
    )
    # The rule was chosen on the selection split's own MC, and calibration followed it.
    rules = json.loads(w.path("rules.json").read_text())
    assert rules["inputs"] == w.prof.n_rule and rules["winner"] in rules["rules"]
    assert json.loads(w.path("calibration.json").read_text())["rule"] == rules["winner"]
    assert set(metrics["rules"]["test"]) == set(rules["rules"])
    winner_has_map = get_rule(rules["winner"]).map_tau is not None
    assert ("score_map_x" in b.manifest["calibration"]) == winner_has_map
    assert "## Calibration rules" in w.path("report/report.md").read_text()
    cap = metrics["cap"]
    top = cal["probs"].argmax(1)
    at_cap = np.mean(cal["counts"][np.arange(len(top)), top] == w.prof.n_cal)
    share = cap["calibration inputs with every draw on the surrogate's class"]
    assert share == pytest.approx(at_cap, abs=1e-4)
    z_cap = norm.ppf(w.prof.beta ** (1 / w.prof.n_cal))
    assert cap["largest radius σ·Φ⁻¹(p_cap) (at q̂ = 0)"] == pytest.approx(w.config.sigma * z_cap, abs=1e-4)


def test_train_surrogate_takes_an_edge_arch_and_refuses_an_unknown_one(tmp_path):
    from rrise.calibrate.models import load_model

    work = str(tmp_path / "w")
    common = ["--workdir", work, "--dataset", "digits", "--no-progress"]
    for stage in ("train-base", "targets"):
        assert runner.invoke(app, [stage, *common]).exit_code == 0
    bad = runner.invoke(app, ["train-surrogate", *common, "--arch", "resnet-9000"])
    assert bad.exit_code == 1 and "unknown surrogate arch" in bad.output
    ok = runner.invoke(app, ["train-surrogate", *common, "--arch", "cnn", "--augment", "shift"])
    assert ok.exit_code == 0, ok.output
    _, info = load_model(tmp_path / "w" / "surrogate.pt")
    assert info["arch"] == "cnn" and info["augment"] == "shift"
    assert not (tmp_path / "w" / "surrogate.ckpt").exists()  # the finished model supersedes it


def test_train_base_is_reproducible_across_runs(tmp_path):
    """Same configuration, two work folders: the same base model, weight for weight."""
    import torch

    from rrise.calibrate.models import load_model

    for name in ("a", "b"):
        args = ["train-base", "--workdir", str(tmp_path / name), "--dataset", "digits", "--no-progress"]
        assert runner.invoke(app, args).exit_code == 0
    a, _ = load_model(tmp_path / "a" / "base.pt")
    b, _ = load_model(tmp_path / "b" / "base.pt")
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)
