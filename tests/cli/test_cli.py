"""The command line as a user meets it: help, bad input, tampered bundles, no torch at the edge."""

import json
import shutil
import subprocess
import sys

import pytest
import typer.main
from typer.testing import CliRunner

from rrise.cli import app
from tests.conftest import NO_TORCH_PRELUDE

runner = CliRunner()
COMMANDS = [
    "demo",
    "train-base",
    "targets",
    "train-surrogate",
    "calibrate",
    "cohen",
    "certify",
    "evaluate",
    "export",
    "inspect",
    "run",
    "subscribe",
    "audit",
]


def test_help_lists_every_command_without_importing_torch():
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "rrise", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for name in COMMANDS:
        assert name in out.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines()}
    assert "torch" not in imported and "scipy" not in imported


def _command_paths(command, path=()):
    """Every command and command group of the CLI, as the words that call it."""
    yield list(path)
    for name in getattr(command, "commands", {}):
        yield from _command_paths(command.commands[name], (*path, name))


ALL_COMMANDS = list(_command_paths(typer.main.get_command(app)))


@pytest.mark.parametrize("path", ALL_COMMANDS, ids=lambda p: " ".join(p) or "rrise")
def test_each_command_has_help_with_an_example(path):
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output


def test_every_command_is_walked_for_its_help():
    assert {"build", "select-rule", "keys", "train-baseline", "reference"} <= {
        p[0] for p in ALL_COMMANDS if p
    }
    assert ["export", "bundle"] in ALL_COMMANDS and [] in ALL_COMMANDS


def test_profile_backed_flags_take_their_help_from_the_profile_field():
    from dataclasses import fields

    from rrise.calibrate.profiles import PROFILES, Profile

    declared = {f.name: f.metadata["help"] for f in fields(Profile) if f.metadata.get("help")}
    text = " ".join(runner.invoke(app, ["train-surrogate", "--help"], env={"COLUMNS": "400"}).output.split())
    for name in ("augment", "steps", "draws", "hard_fraction"):
        assert " ".join(declared[name].rstrip(".").replace("`", "").split()) in text, name
    steps = ", ".join(f"{p.name} {p.steps}" for p in PROFILES.values())
    assert f"(default: the profile's: {steps})" in text
    calibrate = " ".join(runner.invoke(app, ["calibrate", "--help"], env={"COLUMNS": "400"}).output.split())
    assert " ".join(declared["cap_draws"].rstrip(".").replace("`", "").split()) in calibrate
    assert (
        "(default: those rrise select-rule --cap-draws chose the rule with, else the profile's)" in calibrate
    )


def test_run_help_groups_its_flags_by_concern():
    text = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200"}).output
    panels = [line.split("─ ", 1)[1].split(" ─")[0] for line in text.splitlines() if line.startswith("╭─ ")]
    assert panels[-5:] == [
        "Bundle and source",
        "Stream",
        "Outputs",
        "Watch: shift alarm and out-of-distribution flag",
        "Adaptive: Monte Carlo draws where the surrogate's radius falls short",
    ]
    adaptive = text[text.index("╭─ Adaptive") :]
    assert "--mc-budget" in adaptive and "--mc-budget" not in text[: text.index("╭─ Adaptive")]


def test_cohen_says_it_is_cohens_monte_carlo_baseline_and_certify_is_its_deprecated_alias():
    result = runner.invoke(app, ["cohen", "--help"])
    assert "Cohen's Monte Carlo baseline" in " ".join(result.output.split())
    old = runner.invoke(app, ["certify", "--help"])
    assert old.exit_code == 0 and "deprecated" in old.output.lower()
    assert "Cohen's Monte Carlo baseline" in " ".join(old.output.split())
    listing = " ".join(runner.invoke(app, ["--help"]).output.split())
    assert "cohen Cohen's Monte Carlo baseline" in listing
    assert "certify The former name of rrise cohen" in listing


def test_missing_dataset_says_how_to_get_it(tmp_path):
    result = runner.invoke(
        app,
        [
            "train-base",
            "--workdir",
            str(tmp_path / "w"),
            "--dataset",
            "mnist",
            "--data-dir",
            str(tmp_path / "nothing-here"),
        ],
    )
    assert result.exit_code == 1
    assert "mnist not found" in result.output and "--data-dir" in result.output


def test_run_refuses_a_source_that_does_not_open(tiny_bundle, tmp_path):
    missing = runner.invoke(app, ["run", "--bundle", str(tiny_bundle), "--source", str(tmp_path / "no.avi")])
    assert missing.exit_code != 0 and "no.avi" in missing.output
    garbage = tmp_path / "garbage.avi"
    garbage.write_bytes(b"\x00" * 4096)
    bad = runner.invoke(app, ["run", "--bundle", str(tiny_bundle), "--source", str(garbage)])
    assert bad.exit_code != 0 and "garbage.avi" in bad.output


def test_tampered_bundle_is_refused_by_name(tiny_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    with open(bundle / "surrogate.onnx", "ab") as f:
        f.write(b"\x00")
    result = runner.invoke(
        app, ["run", "--bundle", str(bundle), "--source", str(tiny_bundle.parent / "frames")]
    )
    assert result.exit_code == 1 and "surrogate.onnx" in result.output
    inspected = runner.invoke(app, ["inspect", str(bundle)])
    assert inspected.exit_code == 1 and "surrogate.onnx" in inspected.output
    ok = runner.invoke(app, ["inspect", str(tiny_bundle), "--json"])
    assert ok.exit_code == 0 and json.loads(ok.output)["ok"] is True


def test_run_without_torch_certifies_every_frame_and_reports_bad_ones(tiny_bundle, tmp_path):
    frames = tiny_bundle.parent / "frames"
    out = tmp_path / "records.jsonl"
    code = NO_TORCH_PRELUDE + (
        "from rrise.cli import main\n"
        f"main(['run', '--bundle', {str(tiny_bundle)!r}, '--source', {str(frames)!r},"
        f" '--jsonl', {str(out)!r}])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 9  # 8 frames and one corrupt file
    errors = [r for r in records if r["error"]]
    assert len(errors) == 1 and errors[0]["pred"] is None
    good = [r for r in records if not r["error"]]
    assert all(r["v"] == 1 and r["bundle"] for r in good)
    assert any(r["pred"] is not None for r in good)


def test_run_takes_a_config_file_and_key_value_overrides_flags_winning(tiny_bundle, tmp_path):
    frames = tiny_bundle.parent / "frames"
    out = tmp_path / "records.jsonl"
    config = tmp_path / "run.yaml"
    config.write_text(
        f"bundle: {tiny_bundle}\nsource: {frames}\nstream:\n  max_frames: 2\n  status_interval: 0\n"
        f"outputs:\n  jsonl: {tmp_path / 'from-config.jsonl'}\n"
    )
    result = runner.invoke(
        app, ["run", "--config", str(config), f"outputs.jsonl={out}", "stream.max_frames=5"]
    )
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 5 and not (tmp_path / "from-config.jsonl").exists()
    flagged = runner.invoke(app, ["run", "--config", str(config), "stream.max_frames=5", "--max-frames", "3"])
    assert flagged.exit_code == 0, flagged.output
    assert len((tmp_path / "from-config.jsonl").read_text().splitlines()) == 3  # the flag wins


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["stream.batchsize=2"], "unknown option 'stream.batchsize'"),
        (["stream.batch=0"], "--batch must be >= 1, got 0"),
        (["--no-output", "--jsonl", "-"], "--no-output contradicts the outputs asked for"),
        (["watch.monitor_window=many"], "watch.monitor_window takes an integer, got 'many'"),
    ],
)
def test_run_refuses_bad_options_in_one_line_naming_them(tiny_bundle, args, said):
    result = runner.invoke(app, ["run", "--bundle", str(tiny_bundle), "--source", "0", *args])
    assert result.exit_code == 2 and said in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_every_run_flag_of_the_design_keeps_its_name():
    text = " ".join(runner.invoke(app, ["run", "--help"], env={"COLUMNS": "300"}).output.split())
    for flag in (
        "--bundle", "--source", "--publish", "--jsonl", "--backend", "--max-frames", "--record",
        "--save-video", "--foxglove", "--expect-id", "--trust", "--no-monitor", "--no-ood",
        "--monitor-window", "--drop-policy", "--realtime", "--loop", "--retry", "--curve-secret",
        "--no-output", "--wait-subscribers", "--precision", "--config",
    ):  # fmt: skip
        assert flag in text, flag


def _targets(workdir, *args):
    return runner.invoke(app, ["targets", "--workdir", str(workdir), "--dataset", "digits", *args])


def test_a_profile_field_set_on_the_command_line_is_recorded_in_run_json(tmp_path):
    done = _targets(tmp_path / "w", "--profile", "quick", "profile.n_targets=7", "--no-progress")
    assert "train-base" in done.output  # the stage needs the base model; the folder is made
    config = json.loads((tmp_path / "w" / "run.json").read_text())["config"]
    assert config["profile"] == "quick" and config["profile_overrides"] == {"n_targets": 7}
    again = _targets(tmp_path / "w", "--no-progress")  # the recorded value holds without restating it
    assert "another configuration" not in again.output and "train-base" in again.output
    other = _targets(tmp_path / "w", "profile.n_targets=8")
    assert (
        other.exit_code == 1 and "profile_overrides" in other.output and "another --workdir" in other.output
    )


def test_a_profile_mapping_in_a_config_file_is_the_same_as_overrides(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("profile:\n  name: quick\n  n_targets: 9\n  alphas: [0.05]\n")
    _targets(tmp_path / "w", "--config", str(config), "--no-progress")
    recorded = json.loads((tmp_path / "w" / "run.json").read_text())["config"]
    assert recorded["profile"] == "quick"
    assert recorded["profile_overrides"] == {"alphas": [0.05], "n_targets": 9}


@pytest.mark.parametrize(
    "override, said",
    [("profile.n_targetz=7", "profile.n_targetz"), ("profile.n_targets=many", "profile.n_targets")],
)
def test_a_bad_profile_field_is_refused_in_one_line_naming_it(tmp_path, override, said):
    done = _targets(tmp_path / "w", "--profile", "smoke", override)
    assert done.exit_code == 2 and said in done.output and len(done.output.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()
