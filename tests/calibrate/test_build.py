"""`rrise build`: the user's own ONNX classifier and colour ImageFolder, end to end to a bundle."""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")
pytest.importorskip("onnxruntime")

from torch import nn  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from rrise.cli import app  # noqa: E402

runner = CliRunner()
SIZE = 16
SMOKE = ["--profile", "smoke", "--sigma", "0.25", "--no-progress"]


def _colour(img8: np.ndarray, label: int) -> np.ndarray:
    """A digits image (8×8, 0..16) as a 16×16 colour BGR frame, its tint depending on the class."""
    g = cv2.resize((img8 * (255 / 16)).astype(np.uint8), (SIZE, SIZE), interpolation=cv2.INTER_NEAREST)
    tint = np.array([0.6 + 0.04 * label, 1.0, 1.0 - 0.04 * label])  # B, G, R
    return np.clip(g[..., None] * tint, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """An ImageFolder of 1,000 colour PNGs (10 classes) the model did not train on, and an ONNX model
    trained (with Gaussian noise) on other digits."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("build")
    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    held, train = order[:1000], order[1000:]
    folder = root / "images"
    for i in held:
        cls = folder / f"digit{d.target[i]}"
        cls.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(cls / f"{i:04d}.png"), _colour(d.images[i], d.target[i]))

    # the model: RGB [0, 1] NCHW in, logits out (frames are BGR, the model is RGB)
    x = np.stack([_colour(d.images[i], d.target[i])[..., ::-1] for i in train]).transpose(0, 3, 1, 2)
    x = torch.tensor(x / 255.0, dtype=torch.float32)
    y = torch.tensor(d.target[train])
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )  # fmt: skip
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(15):
        for b in torch.randperm(len(x)).split(100):
            loss = nn.functional.cross_entropy(net(x[b] + 0.25 * torch.randn_like(x[b])), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    onnx = root / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (torch.zeros(1, 3, SIZE, SIZE),), str(onnx), dynamo=False, input_names=["image"],
            output_names=["logits"], dynamic_axes={"image": {0: "b"}, "logits": {0: "b"}},
        )  # fmt: skip
    return {"root": root, "folder": folder, "onnx": onnx, "net": net}


def _build(*args: str):
    return runner.invoke(app, ["build", *args])


def test_build_onnx_on_an_image_folder_to_a_bundle_then_rerun_is_a_no_op(user, tmp_path) -> None:
    from rrise import Bundle

    wd = tmp_path / "run"
    args = ["--model", str(user["onnx"]), "--data", str(user["folder"]), "--workdir", str(wd), *SMOKE]
    result = _build(*args)
    assert result.exit_code == 0, result.output
    assert "base-model evaluations" in result.output and "evaluations/s" in result.output
    bundle_dir = wd / "bundle"
    assert result.output.strip().splitlines()[-1] == str(bundle_dir)
    assert "of 1,000 images of" in result.output and " used" in result.output  # none dropped silently
    assert "## Your images" in (wd / "report" / "report.md").read_text()
    assert "[train-base] importing your model as the base model" in result.output
    assert "[train-base] your model imported in" in result.output
    accuracy = [line for line in result.output.splitlines() if "top-1 accuracy on 200" in line]
    assert len(accuracy) == 1 and "(chance 10.0%)" in accuracy[0], result.output
    verdict = [line for line in result.output.splitlines() if line.startswith("[verdict]")]
    assert len(verdict) == 3 and "RRISE as bundled" in verdict[0] and "Cohen MC" in verdict[0], verdict
    bundle = Bundle.load(bundle_dir)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    pre = manifest["preprocess"]
    assert pre["color"] == "rgb" and pre["resize"] == [SIZE, SIZE]
    assert list(manifest.get("labels", bundle.labels)) == [f"digit{k}" for k in range(10)]
    base_sha = hashlib.sha256((wd / "base.onnx").read_bytes()).hexdigest()
    assert bundle.calibration().base_sha256 == base_sha
    assert (wd / "report" / "metrics.json").exists() and (wd / "certify.tsv").exists()
    assert json.loads((wd / "run.json").read_text())["config"]["user"]["data"] == str(user["folder"])
    _check_routing(wd, manifest)

    # a rerun does nothing: every stage is current
    mtime = (bundle_dir / "manifest.json").stat().st_mtime_ns
    again = _build(*args)
    assert again.exit_code == 0, again.output
    assert "0 base-model evaluations" in again.output
    assert again.output.count("up to date, skipping") == 8
    assert (bundle_dir / "manifest.json").stat().st_mtime_ns == mtime

    # the stage commands work on the folder (they reload the model and images from run.json)
    stage = runner.invoke(app, ["evaluate", "--workdir", str(wd), "--no-progress"])
    assert stage.exit_code == 0, stage.output
    assert "up to date" in stage.output
    forced = runner.invoke(app, ["calibrate", "--workdir", str(wd), "--no-progress", "--force"])
    assert forced.exit_code == 0, forced.output


def _check_routing(wd, manifest: dict) -> None:
    """The routing rule of adaptive certification: chosen on the selection split's own counts, the
    one the report states, in the manifest as ``adaptive`` → ``routing``, and what the runtime
    routes by; the evaluation's routed rows beside the surrogate alone and Cohen, with their figure."""
    from rrise.calibrate.adaptive_eval import RoutingRule
    from rrise.calibrate.adaptive_workdir import ROUTING_BUDGET, ROUTING_DRAWS_FRACTION
    from rrise.runtime import Runtime
    from rrise.sequential import SequentialOptions, stated_stopping

    metrics = json.loads((wd / "report" / "metrics.json").read_text())
    routing = manifest["adaptive"]["routing"]
    assert routing == metrics["adaptive"]["bundled_routing"]
    assert routing["chosen_on"] == "selection" and routing["max_draws_fraction"] == ROUTING_DRAWS_FRACTION
    config = metrics["config"]
    n0, n = (int(x.split(" = ")[1]) for x in config["Cohen MC"].split(", ")[:2])
    assert routing["max_mean_draws"] == pytest.approx(ROUTING_DRAWS_FRACTION * (n0 + n))
    assert routing["selection_mean_draws"] <= routing["max_mean_draws"]
    rules = json.loads((wd / "rules.json").read_text())
    assert routing["selection_inputs"] == rules["inputs"]
    assert routing["mc_budget"] == min(ROUTING_BUDGET, rules["n_mc"], n)
    rule = RoutingRule.from_dict(routing)
    # the routed rows: budgets capped at Cohen's stored n, each rule chosen on the selection split
    rows = metrics["adaptive"]["rows"]
    routed = [r for r in rows.values() if r["kind"] == "adaptive"]
    assert routed and all(
        r["mc_budget"] <= n and r["routing"]["chosen_on"] == "selection split" for r in routed
    )
    assert all(r["p95_draws"] <= r["mc_budget"] for r in routed)
    # the bundled rule is one of them: the report shows how it does on the test inputs
    bundled = rows[metrics["adaptive"]["bundled_row"]]
    assert bundled["mc_budget"] == rule.mc_budget and RoutingRule.from_dict(bundled["routing"]) == rule
    cost = metrics["cost"]
    key = "break-even queries, adaptive with the bundle's routing rule (its draws counted)"
    assert cost[key] == bundled["break_even_queries"]
    assert bundled["per_query_s"] > cost["RRISE per query (s)"] or bundled["mean_draws"] == 0
    assert (wd / "report" / "adaptive_cost.png").is_file()
    # the counts the rule was chosen on are an input of the evaluation and of the bundle, by digest
    store = wd / "selection_counts" / "manifest.json"
    assert rules["counts_sha256"] == hashlib.sha256(store.read_bytes()).hexdigest()
    mc = {"mc_budget": rule.mc_budget, "mc_batch": min(100, rule.mc_budget)}
    # the stopping rule it was chosen with is stated beside it, and is what the runtime runs
    assert manifest["adaptive"]["sequential"] == stated_stopping(SequentialOptions(budget=1_000))
    with Runtime(wd / "bundle", backend="onnxruntime", **mc) as runtime:
        assert runtime.adaptive.routing.origin == "bundle adaptive.routing"
        assert runtime.adaptive.routing.target_radius == rule.target_radius


def test_python_build_returns_the_bundle_path(user, tmp_path) -> None:
    import rrise.calibrate as rc

    # a torch module passed directly: the surrogate is a copy of it
    logs: list[str] = []
    path = rc.build(
        model=user["net"], data=str(user["folder"]), workdir=tmp_path / "py", sigma=0.25, profile="smoke",
        input_size=(SIZE, SIZE), show_progress=False, log=logs.append,
    )  # fmt: skip
    assert path == tmp_path / "py" / "bundle" and (path / "manifest.json").exists()
    assert any("initialised from the base model's weights" in line for line in logs)
    # a copy of the user's trained model keeps its batch-norm statistics while it learns the counts
    meta = torch.load(tmp_path / "py" / "surrogate.pt", weights_only=True, map_location="cpu")["meta"]
    assert meta["freeze_norm"] is True


class _Shifted(nn.Module):
    """The model with its outputs in another class order (class k's score at position k + 1)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return torch.roll(self.net(x), 1, dims=1)


def test_a_model_in_another_class_order_is_refused_before_any_monte_carlo(
    user, tmp_path, monkeypatch
) -> None:
    import rrise.calibrate as rc
    import rrise.calibrate.building as building
    from rrise.calibrate.user_model import UserModelError

    kw = dict(
        data=str(user["folder"]), sigma=0.25, profile="smoke", input_size=(SIZE, SIZE), show_progress=False
    )
    logs: list[str] = []
    with pytest.raises(UserModelError, match=r"near chance \(10\.0%\).*--force"):
        rc.build(model=_Shifted(user["net"]), workdir=tmp_path / "shifted", log=logs.append, **kw)
    assert not (tmp_path / "shifted").exists()  # refused: no folder left behind
    assert any(
        line.startswith("[check] class index → name (sorted folder names): 0 digit0, 1 digit1")
        for line in logs
    )
    assert not any("base-model evaluations" in line for line in logs)  # nothing spent on the Monte Carlo

    class Stop(Exception):
        pass

    def stop(w, log) -> None:
        raise Stop

    monkeypatch.setattr(building, "log_budget", stop)  # --force goes on, to the Monte Carlo
    logs.clear()
    with pytest.raises(Stop):
        rc.build(model=_Shifted(user["net"]), workdir=tmp_path / "forced", log=logs.append, force=True, **kw)
    assert any(line.startswith("[check] --force: going on although") for line in logs), logs


def test_bad_input_exits_1_with_one_clear_line_and_writes_nothing(user, tmp_path) -> None:
    one = tmp_path / "one"
    (one / "only").mkdir(parents=True)
    for i in range(5):
        cv2.imwrite(str(one / "only" / f"{i}.png"), np.full((SIZE, SIZE, 3), i * 40, np.uint8))
    wd = tmp_path / "bad"
    result = _build("--model", str(user["onnx"]), "--data", str(one), "--workdir", str(wd), *SMOKE)
    assert result.exit_code == 1
    assert "Traceback" not in result.output and "class" in result.output
    assert not wd.exists()

    # a model with 10 classes on data with 3
    three = tmp_path / "three"
    for k in range(3):
        (three / f"c{k}").mkdir(parents=True)
        for i in range(4):
            cv2.imwrite(str(three / f"c{k}" / f"{i}.png"), np.full((SIZE, SIZE, 3), 30 * k + i, np.uint8))
    result = _build("--model", str(user["onnx"]), "--data", str(three), "--workdir", str(wd), *SMOKE)
    assert result.exit_code == 1
    assert "outputs 10 classes" in result.output and "has 3" in result.output
    assert "Traceback" not in result.output and not wd.exists()

    # a model path that is not there
    result = _build("--model", str(tmp_path / "nope.onnx"), "--data", str(three), "--workdir", str(wd))
    assert result.exit_code == 1 and "Traceback" not in result.output and not wd.exists()


def test_budget_minutes_sizes_the_build_once_and_a_rerun_resumes(user, tmp_path, monkeypatch) -> None:
    """With the rates fixed (the probe replaced), `--budget-minutes` records the sizes it chose in
    run.json (N_cal = n), the stages run at them, the estimate fits the budget, and the same command
    again finds every stage current. A budget below the smallest sizes is refused, leaving nothing."""
    import rrise.calibrate.build_cost as build_cost
    from rrise.calibrate.sizing import Rates, SplitSizes, stage_seconds
    from rrise.calibrate.workdir import RunConfig, Workdir, recorded_config

    rates = Rates(evaluations_per_s=20_000.0, train_step_s=0.01, train_batch=128)
    monkeypatch.setattr(build_cost, "measure_rates", lambda w: (rates, 3, w.prof))
    wd = tmp_path / "budget"
    args = ["--model", str(user["onnx"]), "--data", str(user["folder"]), "--workdir", str(wd), *SMOKE]
    result = _build(*args, "--budget-minutes", "0.5")
    assert result.exit_code == 0, result.output
    sizes = recorded_config(wd)["profile_overrides"]
    assert set(sizes) == {"n_cal", "n"} and sizes["n_cal"] == sizes["n"] >= 500  # smoke: a fixed target store
    assert f"[build] --budget-minutes 0.5: n {sizes['n']:,}, n_cal {sizes['n_cal']:,}" in result.output
    assert "[build] the whole build: about" in result.output
    w = Workdir(root=wd, config=RunConfig(**recorded_config(wd)), show_progress=False, log=lambda _s: None)
    assert json.loads((wd / "calibration.json").read_text())["n_mc"] == sizes["n_cal"]
    estimate = stage_seconds(w.prof, SplitSizes.of(w.splits()), rates, 3)
    assert sum(estimate.values()) <= 30.0

    again = _build(*args, "--budget-minutes", "0.5")
    assert again.exit_code == 0, again.output
    assert (
        "sizes chosen when this folder was made" in again.output
        and "0 base-model evaluations" in again.output
    )
    plain = _build(*args)  # without the flag: the folder's sizes, resumed
    assert plain.exit_code == 0 and "0 base-model evaluations" in plain.output, plain.output

    short = _build(
        *[a if a != str(wd) else str(tmp_path / "short") for a in args], "--budget-minutes", "0.001"
    )
    assert short.exit_code == 1 and "--budget-minutes 0.001 is too short" in short.output
    assert "Traceback" not in short.output and not (tmp_path / "short").exists()


def test_rrise_build_help_names_the_interface() -> None:
    result = runner.invoke(app, ["build", "--help"])
    assert result.exit_code == 0
    for opt in ("--model", "--data", "--workdir", "--sigma", "--profile", "--train-data", "--output",
                "--output-kind", "--input-size", "--channels", "--mean", "--std", "--weights",
                "--surrogate-arch", "--budget-minutes", "--no-progress", "--force"):  # fmt: skip
        assert opt in result.output, opt
    wide = runner.invoke(app, ["build", "--help"], env={"COLUMNS": "400"})
    text = " ".join(wide.output.replace("│", " ").split())
    assert "root/<class>/<image>" in text and "sorted order" in text  # the placeholders survive markup
    assert "called with no arguments" in text and "state_dict" in text


def test_build_options_and_keywords_are_one_build(user, tmp_path) -> None:
    import rrise.calibrate as rc
    from rrise.calibrate.options import BuildOptions

    wd = tmp_path / "opts"
    options = BuildOptions(
        model=str(user["onnx"]), data=str(user["folder"]), workdir=wd, profile="smoke", no_progress=True
    )
    assert rc.build(options, log=lambda _line: None) == wd / "bundle"
    # the same build through DESIGN's keywords finds every stage current
    logs: list[str] = []
    path = rc.build(
        model=user["onnx"], data=user["folder"], workdir=wd, sigma=0.25, profile="smoke",
        show_progress=False, log=logs.append,
    )  # fmt: skip
    assert path == wd / "bundle"
    assert any("0 base-model evaluations" in line for line in logs)
    with pytest.raises(TypeError, match="no other arguments"):
        rc.build(options, sigma=0.5)


def test_build_options_refuse_bad_values_naming_the_flag() -> None:
    from rrise.calibrate.options import BuildOptions

    base = {"model": "m.onnx", "data": "d", "workdir": "w"}
    for bad, flag in (
        ({"sigma": 0.0}, "--sigma"),
        ({"profile": "huge"}, "--profile"),
        ({"channels": "cmyk"}, "--channels"),
        ({"output_kind": "scores"}, "--output-kind"),
        ({"input_size": (0, 8)}, "--input-size"),
        ({"mean": 0.5}, "--mean and --std"),
        ({"mean": 0.5, "std": -1.0}, "--std"),
        ({"seed": -1}, "--seed"),
    ):
        with pytest.raises(ValueError, match=flag):
            BuildOptions(**base, **bad)
    o = BuildOptions(**base, input_size=8, mean="0.5,0.4,0.3", std=[0.2, 0.2, 0.2], channels="bgr")
    assert o.input_size == (8, 8) and o.mean == (0.5, 0.4, 0.3) and o.channels.value == "bgr"


def test_build_options_import_no_torch() -> None:
    import subprocess
    import sys

    code = "import sys, rrise.calibrate.options; assert not {'torch', 'numpy'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_run_json_written_before_the_typed_specs_still_opens(tmp_path) -> None:
    """run.json's `user` record as earlier versions wrote it (one-element lists, no `surrogate_arch`
    default written out) reads into the same specs, so the folder resumes."""
    from rrise.calibrate.specs import read_user_record
    from rrise.calibrate.workdir import RunConfig, Workdir, recorded_config

    old = {
        "model": "/models/net.onnx",
        "model_options": {"weights": None, "output": None, "output_kind": None, "input_size": [16, 16],
                          "channels": None, "mean": [0.5], "std": [0.25]},
        "data": "/data/images", "train_data": None, "data_dir": None,
        "preprocess": {"color": "rgb", "resize": [16, 16], "interpolation": "area", "layout": "NCHW"},
        "input_shape": [3, 16, 16], "surrogate_arch": "auto", "data_sha256": "ab" * 32, "data_name": "images",
    }  # fmt: skip
    wd = tmp_path / "old"
    wd.mkdir()
    config = {"dataset": "user", "profile": "smoke", "sigma": 0.25, "seed": 0, "user": old}
    (wd / "run.json").write_text(json.dumps({"config": config, "stage_seconds": {}}))

    model, data = read_user_record(old)
    assert model.mean == (0.5,) and model.input_size == (16, 16) and data.input_shape == (3, 16, 16)
    # a stage command (the record as run.json has it) and a rerun of build (the specs) both open it
    Workdir.open(wd, RunConfig(**recorded_config(wd)), show_progress=False)
    again = RunConfig(dataset="user", profile="smoke", sigma=0.25, model=model, data=data)
    w = Workdir.open(wd, again, show_progress=False)
    assert w.config.model_spec == model and w.config.data_spec == data
    other = RunConfig(
        dataset="user", profile="smoke", sigma=0.25, model=model, data=replace(data, sha256="cd" * 32)
    )
    with pytest.raises(ValueError, match="another configuration.*user"):
        Workdir.open(wd, other, show_progress=False)


def test_profile_fields_are_the_flag_names_and_old_names_still_read() -> None:
    from dataclasses import fields

    from rrise.calibrate.profiles import PROFILES, RENAMED, Profile

    full = PROFILES["full"]
    helps = {f.name: f.metadata.get("help") for f in fields(Profile)}
    for flag_field in ("steps", "draws", "hard_fraction", "augment", "cap_draws", "surrogate_arch"):
        assert helps[flag_field], flag_field
    back = {new: old for old, new in RENAMED.items()}
    written_before = {back.get(k, k): v for k, v in full.to_dict().items()}
    assert "fresh_hard_fraction" in written_before and Profile.from_dict(written_before) == full
