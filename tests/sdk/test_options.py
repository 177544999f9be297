"""Typed options declared once: flags, --config FILE.yaml and key=value overrides, in that order of
precedence (defaults < config < key=value < flags), and one-line refusals naming the key."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from rrise.options import OptionError, bind, convert, fields_of, make_options, resolve

Color = Enum("Color", {n: n for n in ("red", "green", "map+bins")}, type=str)


@dataclass(frozen=True, kw_only=True)
class Shift:
    monitor: bool = field(default=True, metadata={"help": "The alarm."})
    monitor_window: int | None = field(default=None, metadata={"help": "Window."})

    def __post_init__(self) -> None:
        if self.monitor_window is not None and self.monitor_window < 1:
            raise ValueError(f"--monitor-window must be >= 1, got {self.monitor_window}")


@dataclass(frozen=True, kw_only=True)
class Job:
    bundle: Path = field(metadata={"help": "Bundle."})
    color: Color = field(default=Color.red, metadata={"help": "Colour."})
    mean: tuple[float, ...] = field(default=(), metadata={"help": "Mean."})
    size: tuple[int, int] | None = field(default=None, metadata={"help": "H W."})
    rate: float = field(default=0.5, metadata={"help": "Rate.", "flag": "--the-rate"})
    no_output: bool = field(default=False, metadata={"help": "Discard."})
    shift: Shift = field(default_factory=Shift)


@dataclass(frozen=True)
class Sizes:
    m: int = 100
    alphas: tuple[float, ...] = (0.01,)


GOT: list[tuple[Job, dict]] = []


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.command()
    @bind(Job, extras={"profile": Sizes})
    def job(options: Job, extras: dict) -> None:
        """Do the job.

        Example: `job --bundle b`"""
        GOT.append((options, extras))
        typer.echo(repr((options, extras)))

    @app.command()
    def other() -> None:
        """Another command, so `job` is a subcommand."""

    return app


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(_app(), ["job", *args])
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def test_fields_are_flattened_with_flags_and_dotted_keys() -> None:
    by_key = {f.key: f for f in fields_of(Job)}
    assert by_key["shift.monitor_window"].flag == "--monitor-window"
    assert by_key["rate"].flag == "--the-rate" and by_key["bundle"].required
    assert by_key["shift.monitor"].group == "Shift"


def test_flags_config_and_overrides_in_order_of_precedence(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text("bundle: from-config\nshift:\n  monitor_window: 7\ncolor: green\nrate: 0.1\n")
    code, out = _run("--config", str(config), "rate=0.2", "shift.monitor_window=8", "--monitor-window", "9")
    assert code == 0, out
    assert GOT[-1][0] == Job(
        bundle=Path("from-config"), color=Color.green, rate=0.2, shift=Shift(monitor_window=9)
    )


def test_tuples_bools_and_enums_from_the_command_line() -> None:
    code, out = _run(
        "--bundle", "b", "--mean", "0.1", "--mean", "0.2,0.3", "--size", "3", "4", "--no-monitor",
        "--no-output", "color=map+bins",
    )  # fmt: skip
    assert code == 0, out
    assert "mean=(0.1, 0.2, 0.3)" in out and "size=(3, 4)" in out and "monitor=False" in out
    assert "no_output=True" in out and "map+bins" in out


def test_profile_fields_are_overridden_by_dotted_key(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text("profile:\n  alphas: [0.01, 0.001]\n")
    code, out = _run("--bundle", "b", "--config", str(config), "profile.m=500")
    assert code == 0, out
    assert "{'profile': {'alphas': (0.01, 0.001), 'm': 500}}" in out
    code, out = _run("--bundle", "b", "profile.n=5")
    assert code == 2 and "unknown option 'profile.n' (known profile keys: m, alphas)" in out


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["bogus=1"], "unknown option 'bogus'"),
        (["rate=fast"], "rate takes a number, got 'fast'"),
        (["color=blue"], "color takes one of red, green, map+bins, got 'blue'"),
        (["shift.monitor_window=0"], "--monitor-window must be >= 1, got 0"),
        (["rate"], "expected key=value, got 'rate'"),
        (["size=1,2,3"], "size takes 2 values, got 3"),
    ],
)
def test_bad_keys_and_values_are_one_line_naming_the_key(args: list[str], said: str) -> None:
    code, out = _run("--bundle", "b", *args)
    assert code == 2 and said in out and len(out.strip().splitlines()) == 1, out


def test_a_missing_required_option_and_a_bad_config_file_are_named(tmp_path: Path) -> None:
    code, out = _run()
    assert code == 2 and "missing --bundle" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    code, out = _run("--config", str(bad))
    assert code == 2 and f"{bad} must hold a mapping" in out
    code, out = _run("--config", str(tmp_path / "none.yaml"))
    assert code == 2 and "cannot read" in out
    bad.write_text("bundle: b\nshift: {monitor_window: x}\n")
    code, out = _run("--config", str(bad))
    assert code == 2 and f"{bad}: shift.monitor_window takes an integer, got 'x'" in out


def test_help_shows_flags_groups_and_the_example() -> None:
    code, out = _run("--help")
    assert code == 0
    for text in ("--bundle", "--monitor-window", "--the-rate", "--config", "KEY=VALUE", "Shift", "Example"):
        assert text in out


def test_python_values_by_leaf_name() -> None:
    job = make_options(Job, bundle="b", monitor_window=3, color="green", mean=[1, 2])
    assert job == Job(bundle=Path("b"), color=Color.green, mean=(1.0, 2.0), shift=Shift(monitor_window=3))
    with pytest.raises(OptionError, match="unknown option 'window'"):
        make_options(Job, bundle="b", window=3)
    assert resolve(Job, config={"bundle": "b"}).options.rate == 0.5


def test_conversions_refuse_what_does_not_fit() -> None:
    assert convert("null", int | None, "k") is None and convert("yes", bool, "k") is True
    assert convert(3.0, int, "k") == 3
    for value, tp in ((True, int), (3.5, int), ("", int), ([1], str)):
        with pytest.raises(OptionError):
            convert(value, tp, "k")


def test_importing_the_options_loads_neither_typer_nor_yaml() -> None:
    code = "import sys, rrise.options; assert 'typer' not in sys.modules and 'yaml' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
