"""The whole pipeline end to end: digits through the CLI, and real Fashion-MNIST in-process."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm
from typer.testing import CliRunner

from rrise import Bundle
from rrise.cli import app
from tests.conftest import FASHION_AVAILABLE

runner = CliRunner()


@pytest.fixture(scope="module")
def digits_demo(tmp_path_factory):
    """`rrise demo` on digits, run once for this module: ``(work folder, CLI result)``. Tests that
    change the folder work on a copy (:func:`_copy`)."""
    work = tmp_path_factory.mktemp("digits-demo") / "demo"
    result = runner.invoke(app, ["demo", "--workdir", str(work), "--dataset", "digits", "--no-progress"])
    return work, result


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_demo_on_digits_writes_every_output_and_streams_records(digits_demo, tmp_path):
    src, result = digits_demo
    assert result.exit_code == 0, result.output
    work = _copy(src, tmp_path / "demo")
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
    _check_adaptive(work, metrics, result.output)
    received = (work / "received.jsonl").read_text().splitlines()
    assert len(received) == 12
    bundle = Bundle.load(work / "bundle")
    # The report and the bundle describe one calibration, made with the work folder's two models.
    record = json.loads((work / "calibration.json").read_text())
    hashes = {"base_sha256": _sha(work / "base.onnx"), "surrogate_sha256": _sha(work / "surrogate.onnx")}
    assert {k: record[k] for k in hashes} == hashes == metrics["models"]
    assert {k: bundle.manifest["calibration"][k] for k in hashes} == hashes
    assert metrics["calibration"] == record

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
    assert json.loads((work / "calibration.json").read_text()) == record  # a refusal changes nothing

    # A high-budget reference replaces Cohen's draws as the violation reference, on its inputs only.
    assert runner.invoke(app, ["reference", "--workdir", str(work), "--no-progress"]).exit_code == 0
    assert runner.invoke(app, ["evaluate", "--workdir", str(work), "--no-progress"]).exit_code == 0
    metrics = json.loads((work / "report/metrics.json").read_text())
    name, rrise = next((k, v) for k, v in metrics["methods"].items() if k.startswith("RRISE"))
    v = rrise["violations"]
    assert v["n_ref"] == 5000 and v["certified"] <= 30
    assert v["against Cohen's estimation draws on every test input"]["n_ref"] == 200
    assert "5000 fresh MC draws on each of 30 test inputs" in metrics["violation_note"]
    # the adaptive rows too, against the reference only: never against the draws they replay
    for row in metrics["adaptive"]["rows"].values():
        assert row["violations"]["n_ref"] == 5000
        assert "against Cohen's estimation draws on every test input" not in row["violations"]
    # Violations over ALL reference inputs against the point estimate, with the detection limit.
    pt = v["above_point_estimate"]
    assert pt["of"] == 30 and pt["count"] >= v["violations"] and pt["ci95"][0] <= pt["rate"] <= pt["ci95"][1]
    limit = v["detection_limit"]
    if v["certified"]:
        assert 0 < limit["median over certified p̃"] <= limit["largest over certified p̃"]
    else:  # nothing certified among the reference inputs: no limit to state
        assert limit == {"median over certified p̃": None, "largest over certified p̃": None}
    # Cohen at α = 0.01 beside α = 0.001, from the same certify-stage counts: never a smaller radius.
    cohen = {k: m for k, m in metrics["methods"].items() if k.startswith("Cohen")}
    strict = next(m for k, m in cohen.items() if k.split("α=")[1].startswith("0.001"))
    loose = next(m for k, m in cohen.items() if k.split("α=")[1].startswith("0.01"))
    assert all(a >= b for a, b in zip(loose["certified_accuracy"], strict["certified_accuracy"]))
    assert any("α=0.001" in k for k in metrics["methods_not_run"])  # m = 200 is too few for α = 0.001
    assert "| p̃ > p̂_ref (all inputs) |" in (work / "report/report.md").read_text()
    # Every one-time evaluation is in the cost, rule selection included when it ran.
    cost = metrics["cost"]
    parts = {k: v for k, v in cost.items() if k.startswith("  of which")}
    assert cost["one-time base-model evaluations"] == sum(parts.values()) > 0
    # The RRISE row is the calibration the bundle gets (--rule bins --bins 2), not a default one.
    assert name.endswith("as bundled") and "confidence bins" in name
    assert rrise["bin_edges"] == record["bin_edges"] and len(rrise["quantile"]) == 2
    assert metrics["calibration"] == record and metrics["rules"]["used"] == "bins"


def _check_adaptive(work: Path, metrics: dict, output: str) -> None:
    """The evaluation's adaptive rows, figure and report section, and the demo's three summary rows
    and adaptive run; digits samples no rule-selection counts, so no routing rule: the bundle states
    none and the adaptive run asks for a radius instead."""
    section = metrics["adaptive"]
    assert (work / "report" / section["figure"]).is_file()
    rows = section["rows"]
    kinds = [r["kind"] for r in rows.values()]
    assert kinds[0] == "surrogate" and kinds[-1] == "cohen" and "required" in kinds
    cohen = rows[next(k for k, r in rows.items() if r["kind"] == "cohen")]
    assert cohen["mean_draws"] == 220 and cohen["draws_ratio_to_cohen"] == 1.0  # n0 + n
    for row in rows.values():
        assert 0 <= row["mean_draws"] <= 220 and 0 <= row["p95_draws"] <= 220
        assert row["draws_ratio_to_cohen"] == pytest.approx(row["mean_draws"] / 220, abs=5e-6)  # 5 decimals
        assert row["per_query_s"] > 0 and row["violations"] is None  # no reference yet
        if row["kind"] == "required":
            assert row["mean_draws"] <= row["mc_budget"] == 200  # budgets capped at the stored n
    assert section["bundled_routing"] is None and any(
        "selection" in why for why in section["not_run"].values()
    )
    assert "adaptive" not in json.loads((work / "bundle/manifest.json").read_text())
    alone = next(r for r in rows.values() if r["kind"] == "surrogate")
    key = "break-even queries, adaptive with the surrogate alone (its draws counted)"
    assert metrics["cost"][key] == alone["break_even_queries"] > 0
    assert cohen["break_even_queries"] is None  # Cohen saves nothing on Cohen
    report = (work / "report/report.md").read_text()
    assert "## Adaptive certification" in report and "![cost and accuracy](adaptive_cost.png)" in report
    # the demo's summary: the surrogate alone, the adaptive mode and Cohen, with their draws
    text = " ".join(output.split())
    assert "Cost and accuracy" in text and "÷ Cohen's" in text
    table = text[text.index("Cost and accuracy") :]
    assert table.index("RRISE alone") < table.index("Adaptive") < table.index("Cohen MC")
    assert "Adaptive: budget 200, --require-radius 0.25" in text
    assert "Adaptive run (--require-radius 0.25, --mc-budget 1000)" in text
    assert "runtime (adaptive)" in json.loads((work / "run.json").read_text())["stage_seconds"]


def test_workdir_refuses_another_configuration(digits_demo, tmp_path):
    work = _copy(digits_demo[0], tmp_path / "w")
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
    # Adaptive rows routed by rules chosen on the selection split's counts, the bundled rule among them.
    routing = Bundle.load(w.path("bundle")).manifest["adaptive"]["routing"]
    assert routing == metrics["adaptive"]["bundled_routing"] and routing["selection_inputs"] == w.prof.n_rule
    routed = [r for r in metrics["adaptive"]["rows"].values() if r["kind"] == "adaptive"]
    assert [r["mc_budget"] for r in routed] == [100, w.prof.n]  # 10², then 10³ and 10⁴ capped at n
    assert all(r["mean_draws"] <= r["mc_budget"] for r in routed)
    assert (
        metrics["adaptive"]["rows"][metrics["adaptive"]["bundled_row"]]["mc_budget"] == routing["mc_budget"]
    )
    # not vacuous: smoke-sized models on 60 test inputs certify 55–60% at r = 0 (RRISE) and 77% (Cohen)
    assert rrise["certified_accuracy"][0] > 0.3 and cohen["certified_accuracy"][0] > 0.5
    cal = np.load(w.path("calibration.npz"), allow_pickle=False)
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

    # `rrise select-rule --cap-draws`: the rule-selection inputs at the cap get their own second stage
    from rrise.calibrate.evaluating import one_time_evaluations

    run_stage(w, "select-rule", cap_draws=2 * w.prof.n_cal)
    rules = json.loads(w.path("rules.json").read_text())
    assert rules["cap_draws"] == 2 * w.prof.n_cal and rules["winner"] in rules["rules"]
    rule_meta = json.loads(w.path("selection_counts/meta.json").read_text())
    cap_meta = json.loads(w.path("selection_cap_counts/meta.json").read_text())
    assert cap_meta["seed"] != rule_meta["seed"] and cap_meta["n"] == 2 * w.prof.n_cal
    sel_counts = _store_counts(w.path("selection_counts"))
    assert cap_meta["num_inputs"] == int((sel_counts.max(axis=1) == w.prof.n_cal).sum()) > 0
    # calibrate follows the rule's cap unless told otherwise
    run_stage(w, "calibrate")
    assert json.loads(w.path("calibration.json").read_text())["cap_draws"] == 2 * w.prof.n_cal
    parts = one_time_evaluations(w)
    assert parts["rule selection at the cap"] == cap_meta["num_inputs"] * 2 * w.prof.n_cal
    assert parts["calibration at the cap"] > 0


def _store_counts(path: Path) -> np.ndarray:
    from rrise.calibrate.store import load_store

    return load_store(path)[1]


def test_train_surrogate_takes_an_edge_arch_and_refuses_an_unknown_one(digits_demo, tmp_path):
    from rrise.calibrate.model_files import load_model

    work = _copy(digits_demo[0], tmp_path / "w")
    common = ["--workdir", str(work), "--no-progress"]
    bad = runner.invoke(app, ["train-surrogate", *common, "--arch", "resnet-9000"])
    assert bad.exit_code == 1 and "unknown surrogate arch" in bad.output
    ok = runner.invoke(app, ["train-surrogate", *common, "--arch", "cnn", "--augment", "shift"])
    assert ok.exit_code == 0, ok.output
    _, info = load_model(work / "surrogate.pt")
    assert info["arch"] == "cnn" and info["augment"] == "shift"
    assert not (work / "surrogate.ckpt").exists()  # the finished model supersedes it


def test_train_base_is_reproducible_across_runs(digits_demo, tmp_path):
    """Same configuration, two work folders: the same base model, weight for weight."""
    import torch

    from rrise.calibrate.model_files import load_model

    args = ["train-base", "--workdir", str(tmp_path / "b"), "--dataset", "digits", "--no-progress"]
    assert runner.invoke(app, args).exit_code == 0
    a, _ = load_model(digits_demo[0] / "base.pt")
    b, _ = load_model(tmp_path / "b" / "base.pt")
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)


# --- provenance: stale inputs are refused by name, never mixed ---------------------------------


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _open(work: Path, log: list[str] | None = None):
    from rrise.calibrate.pipeline import RunConfig, Workdir

    sink = log.append if log is not None else (lambda _msg: None)
    return Workdir.open(work, RunConfig(dataset="digits"), show_progress=False, log=sink)


def _outputs_of(work: Path) -> dict[str, str]:
    names = ["calibration.json", "calibration.npz", "report/metrics.json", "bundle/manifest.json"]
    return {n: _sha(work / n) for n in names} | {
        "bundle/surrogate.onnx": _sha(work / "bundle/surrogate.onnx")
    }


def test_stage_run_too_early_names_the_stage_to_run_first(digits_demo, tmp_path):
    fresh = ["--workdir", str(tmp_path / "fresh"), "--dataset", "digits", "--no-progress"]
    for stage in ("targets", "calibrate", "evaluate", "certify"):
        result = runner.invoke(app, [stage, *fresh])
        assert result.exit_code == 1, (stage, result.output)
        assert "run `rrise train-base` first" in result.output, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    work = _copy(digits_demo[0], tmp_path / "w")
    (work / "surrogate.pt").unlink()
    result = runner.invoke(app, ["calibrate", "--workdir", str(work), "--no-progress"])
    assert result.exit_code == 1
    assert "needs the outputs of train-surrogate (missing surrogate.pt)" in result.output
    assert "run `rrise train-surrogate` first" in result.output


def test_retrained_surrogate_is_never_mixed_with_the_old_calibration(digits_demo, tmp_path, monkeypatch):
    from rrise.calibrate import train
    from rrise.calibrate.pipeline import STAGES, StageNotReady, run_stage

    work = _copy(digits_demo[0], tmp_path / "w")
    before = _outputs_of(work)
    common = ["--workdir", str(work), "--no-progress"]
    # Another surrogate, as good as the first (the digits profile's 3 epochs make a fresh arch or an
    # augmented one too weak to certify anything): the same fit with another shuffling seed.
    fit = train.train_surrogate
    monkeypatch.setattr(train, "train_surrogate", lambda *a, **kw: fit(*a, **{**kw, "seed": kw["seed"] + 1}))
    retrain = runner.invoke(app, ["train-surrogate", *common, "--force"])
    assert retrain.exit_code == 0, retrain.output
    assert _sha(work / "surrogate.onnx") != before["bundle/surrogate.onnx"]

    # evaluate and the bundle refuse, naming the first stale stage and the command that remakes it
    for args in (["evaluate", *common], ["evaluate", *common, "--force"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1, result.output
        assert "select-rule is stale (surrogate.onnx changed since it ran)" in result.output
        assert "run `rrise select-rule` first, then `rrise calibrate`" in result.output
    with pytest.raises(StageNotReady, match="select-rule is stale") as info:
        run_stage(_open(work), "bundle")
    assert info.value.command == "rrise select-rule"
    calibrate = runner.invoke(app, ["calibrate", *common])
    assert calibrate.exit_code == 1 and "run `rrise select-rule` first" in calibrate.output
    assert _outputs_of(work) == before  # nothing was made from the two surrogates mixed

    # Every stage, as the demo runs them: the stale ones run again, the others are skipped.
    log: list[str] = []
    w = _open(work, log)
    counts = _sha(work / "calibration_counts/manifest.json")
    for name in STAGES:
        run_stage(w, name)
    ran = {m.split("]")[0][1:] for m in log if " done in " in m}
    assert ran == {"select-rule", "calibrate", "evaluate", "bundle"}
    assert _sha(work / "calibration_counts/manifest.json") == counts  # the base model's MC is reused
    new = _sha(work / "surrogate.onnx")
    assert json.loads((work / "calibration.json").read_text())["surrogate_sha256"] == new
    assert json.loads((work / "report/metrics.json").read_text())["models"]["surrogate_sha256"] == new
    bundle = Bundle.load(work / "bundle")
    assert bundle.manifest["calibration"]["surrogate_sha256"] == new == _sha(work / "bundle/surrogate.onnx")


def test_train_surrogate_steps_and_draws_set_the_fresh_targets_and_their_cost(digits_demo, tmp_path):
    work = _copy(digits_demo[0], tmp_path / "w")
    common = ["--workdir", str(work), "--no-progress"]
    assert not (work / "surrogate_cost.json").exists()  # the digits profile fits its fixed store
    options = ["--steps", "3", "--draws", "2", "--augment", "shift"]
    result = runner.invoke(app, ["train-surrogate", *common, *options])
    assert result.exit_code == 0, result.output
    assert torch_load_meta(work / "surrogate.pt")["augment"] == "shift"  # drawn on the shifted images
    cost = json.loads((work / "surrogate_cost.json").read_text())
    batch = cost["fresh_batch"]
    assert (cost["fresh_steps"], cost["fresh_draws"]) == (3, 2) and 0 < batch <= 128
    assert cost["base_evaluations"] == 3 * batch * 2
    history = torch_load_meta(work / "surrogate.pt")["history"]
    assert history["eval_steps"][-1] == 3 and history["base_evaluations"] == 3 * batch * 2
    # --steps 0: back to the fixed target store
    again = runner.invoke(app, ["train-surrogate", *common, "--steps", "0"])
    assert again.exit_code == 0, again.output
    assert not (work / "surrogate_cost.json").exists()  # a fixed-store fit has no fresh draws
    assert "eval_steps" not in torch_load_meta(work / "surrogate.pt")["history"]
    bad = runner.invoke(app, ["train-surrogate", *common, "--draws", "0"])
    assert bad.exit_code == 2 and "--draws" in bad.output


def _train_surrogate_on_copy(digits_demo, tmp_path: Path, *options: str) -> tuple[Path, str, dict]:
    """`rrise train-surrogate` with 3 fresh steps of 2 draws and ``options`` on a copy of the demo
    folder: ``(folder, output, surrogate_cost.json)``."""
    work = _copy(digits_demo[0], tmp_path / "w")
    args = ["--steps", "3", "--draws", "2", *options, "--no-progress"]
    result = runner.invoke(app, ["train-surrogate", "--workdir", str(work), *args])
    assert result.exit_code == 0, result.output
    return work, result.output, json.loads((work / "surrogate_cost.json").read_text())


def test_train_surrogate_hard_fraction_probes_the_pool_and_counts_it(digits_demo, tmp_path):
    from rrise.calibrate.fit import HARD_PROBE_DRAWS, fresh_pool
    from rrise.calibrate.workdir import RunConfig, Workdir, recorded_config

    work, output, cost = _train_surrogate_on_copy(digits_demo, tmp_path, "--hard-fraction", "0.5")
    assert "pool images to find hard ones" in output
    pool = len(fresh_pool(Workdir(work, RunConfig(**recorded_config(work)), show_progress=False)))
    assert cost["hard_probe_evaluations"] == pool * HARD_PROBE_DRAWS
    assert cost["base_evaluations"] == 3 * cost["fresh_batch"] * 2 + pool * HARD_PROBE_DRAWS
    assert cost["fresh_hard_fraction"] == 0.5
    assert torch_load_meta(work / "surrogate.pt")["hard_fraction"] == 0.5
    bad = runner.invoke(app, ["train-surrogate", "--workdir", str(work), "--hard-fraction", "1"])
    assert bad.exit_code == 2 and "--hard-fraction" in bad.output


def test_train_surrogate_distil_first_spends_one_vote_per_image_then_the_fresh_targets(digits_demo, tmp_path):
    work, output, cost = _train_surrogate_on_copy(digits_demo, tmp_path, "--distil-steps", "4")
    assert "distil first: 4 steps" in output
    batch = cost["fresh_batch"]
    assert cost["distil_steps"] == 4
    assert cost["base_evaluations"] == 4 * batch * 1 + 3 * batch * 2  # every vote counted
    history = torch_load_meta(work / "surrogate.pt")["history"]
    assert history["distil"]["eval_steps"][-1] == 4 and history["distil"]["base_evaluations"] == 4 * batch
    assert history["eval_steps"][-1] == 3
    assert not list(work.glob("*.ckpt"))  # both phases' checkpoints are gone once the model is saved
    bad = runner.invoke(app, ["train-surrogate", "--workdir", str(work), "--distil-steps", "-1"])
    assert bad.exit_code == 2 and "--distil-steps" in bad.output


def torch_load_meta(path: Path) -> dict:
    import torch

    return torch.load(path, weights_only=True, map_location="cpu")["meta"]


def test_retrained_base_model_makes_everything_made_from_it_stale(digits_demo, tmp_path, monkeypatch):
    from rrise.calibrate import train
    from rrise.calibrate.pipeline import StageNotReady, run_stage

    work = _copy(digits_demo[0], tmp_path / "w")
    before = _outputs_of(work)
    old_base = _sha(work / "base.onnx")
    fit = train.train_base
    monkeypatch.setattr(train, "train_base", lambda *a, **kw: fit(*a, **{**kw, "epochs": 1}))
    run_stage(_open(work), "train-base", force=True)  # another base model
    assert _sha(work / "base.onnx") != old_base

    common = ["--workdir", str(work), "--no-progress"]
    for stage in ("evaluate", "calibrate", "train-surrogate"):
        result = runner.invoke(app, [stage, *common])
        assert result.exit_code == 1, result.output
        assert "targets is stale (base.onnx changed since it ran): run `rrise targets` first" in result.output
    with pytest.raises(StageNotReady, match="targets is stale") as info:
        run_stage(_open(work), "bundle")
    assert info.value.stage == "targets"
    assert _outputs_of(work) == before

    # A calibration record made with another base model is refused by name, even with a current
    # provenance record (e.g. calibration.json copied from another work folder).
    for name in ("base.pt", "base.onnx"):  # the first base model again
        shutil.copy(digits_demo[0] / name, work / name)
    record = json.loads((work / "calibration.json").read_text())
    (work / "calibration.json").write_text(json.dumps({**record, "base_sha256": "0" * 64}))
    result = runner.invoke(app, ["evaluate", *common])
    assert result.exit_code == 1 and "calibration.json was made with another base.onnx" in result.output
    with pytest.raises(StageNotReady, match="another base.onnx"):
        run_stage(_open(work), "bundle")


def test_provenance_on_a_toy_pipeline(tmp_path):
    """a → b → c (c also uses the optional d): missing, stale and appeared inputs, by name."""
    from rrise.calibrate import provenance as prov

    def stage(name, needs=(), uses=()):
        return prov.Stage(name, lambda: None, (f"{name}.txt",), needs=needs, uses=uses)

    stages = {
        s.name: s for s in (stage("a"), stage("b", ("a",)), stage("d", ("a",)), stage("c", ("b",), ("d",)))
    }

    def run(name, text="x"):
        prov.check_ready(tmp_path, stages, name)
        inputs = prov.current_inputs(tmp_path, stages, name)
        (tmp_path / f"{name}.txt").write_text(text)
        prov.write_record(tmp_path, stages, name, inputs)

    with pytest.raises(prov.StageNotReady, match=r"c needs the outputs of a \(missing a.txt\)") as info:
        prov.check_ready(tmp_path, stages, "c")
    assert info.value.stage == "a" and "then `rrise b`" in str(info.value)
    for name in "abc":
        run(name)
    assert all(prov.is_current(tmp_path, stages, n) for n in "abc")
    run("a", "another a")  # a root stage's new outputs make what was made from the old ones stale
    assert prov.is_current(tmp_path, stages, "a") and not prov.is_current(tmp_path, stages, "b")
    with pytest.raises(prov.StageNotReady, match=r"b is stale \(a.txt changed since it ran\): run `rrise b`"):
        prov.check_ready(tmp_path, stages, "c")
    run("b")  # the same bytes as before: c, made from them, is still current (content, not time)
    assert prov.is_current(tmp_path, stages, "c")
    run("b", "another b")
    assert not prov.is_current(tmp_path, stages, "c")  # c is stale itself: it reruns when asked
    prov.check_ready(tmp_path, stages, "c")
    run("c")
    run("d")  # an optional input that appears after c ran makes c stale too
    assert not prov.is_current(tmp_path, stages, "c")
    (tmp_path / "d.txt").unlink()
    assert prov.is_current(tmp_path, stages, "c")


def test_draws_at_the_cap_reach_the_calibration_report_and_bundle(digits_demo, tmp_path):
    """`rrise calibrate --cap-draws N2`: inputs whose N_cal draws all fell on one class get N2 more,
    the cap rises to β^(1/N2), and the report, the bundle and `inspect --verify` all use both stages."""
    src, result = digits_demo
    assert result.exit_code == 0, result.output
    work = _copy(src, tmp_path / "demo")
    plain = json.loads((work / "calibration.json").read_text())
    too_few = runner.invoke(app, ["calibrate", "--workdir", str(work), "--cap-draws", str(plain["n_mc"])])
    assert too_few.exit_code == 1 and "must exceed" in too_few.output
    done = runner.invoke(app, ["calibrate", "--workdir", str(work), "--cap-draws", "2000"])
    assert done.exit_code == 0, done.output
    record = json.loads((work / "calibration.json").read_text())
    assert record["cap_draws"] == 2000 and record["p_cap"] == pytest.approx(record["beta"] ** (1 / 2000))
    with np.load(work / "calibration.npz") as z:
        counts, cap_counts = z["counts"], z["cap_counts"]
    at_cap = counts.max(axis=1) == record["n_mc"]
    assert at_cap.any() and (cap_counts.sum(axis=1) == np.where(at_cap, 2000, 0)).all()
    # the second stage draws its own noise (its own seed stream), independent of the first
    seeds = [
        json.loads((work / s / "meta.json").read_text())["seed"]
        for s in ("calibration_counts", "calibration_cap_counts")
    ]
    assert seeds[0] != seeds[1]
    again = runner.invoke(app, ["demo", "--workdir", str(work), "--no-progress"])  # stale stages rerun
    assert again.exit_code == 0, again.output
    metrics = json.loads((work / "report/metrics.json").read_text())
    assert metrics["calibration"]["cap_draws"] == 2000
    assert any("N₂ = 2000" in k for k in metrics["cap"])
    assert metrics["cost"]["  of which calibration at the cap"] == 2000 * int(at_cap.sum())
    manifest = json.loads((work / "bundle/manifest.json").read_text())
    assert manifest["calibration"]["cap_draws"] == 2000
    verified = runner.invoke(app, ["inspect", str(work / "bundle"), "--verify"])
    assert verified.exit_code == 0, verified.output
    assert "cap_draws = 2000" in verified.output
    # the scores were clipped at abstention (the default), and --verify recomputed them so
    assert manifest["calibration"]["clip_at_abstention"] is True
    assert "clipped at each calibration input's abstention threshold" in verified.output


def test_calibrate_clips_scores_at_abstention_by_default_and_can_keep_the_plain_score(digits_demo, tmp_path):
    """The default calibration clips each score at its input's abstention threshold: recorded, and
    its quantile no larger than the plain score's on the same counts (`--no-clip-at-abstention`)."""
    work = _copy(digits_demo[0], tmp_path / "w")
    clipped = json.loads((work / "calibration.json").read_text())
    plain_run = runner.invoke(
        app, ["calibrate", "--workdir", str(work), "--force", "--no-clip-at-abstention", "--no-progress"]
    )
    assert plain_run.exit_code == 0, plain_run.output
    plain = json.loads((work / "calibration.json").read_text())
    assert clipped["clip_at_abstention"] is True and "clip_at_abstention" not in plain
    assert clipped["quantile"] <= plain["quantile"]
    assert {k: v for k, v in clipped.items() if k not in ("quantile", "clip_at_abstention")} == {
        k: v for k, v in plain.items() if k != "quantile"
    }
