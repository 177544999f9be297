"""Ctrl-C while the ``rrise`` console entry is still loading is one line and exit 130, not a traceback."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rrise.__main__ import INTERRUPTED

# Any import of typer (the CLI's first heavy import) is interrupted, as a Ctrl-C would be.
INTERRUPT_WHILE_LOADING = """
import sys, importlib.abc
class _CtrlC(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "typer" or name.startswith("typer."):
            raise KeyboardInterrupt
sys.meta_path.insert(0, _CtrlC())
from rrise.__main__ import {entry}
sys.argv = ["rrise", "run", "--bundle", "b", "--source", "s"]
{entry}()
"""


@pytest.mark.parametrize("entry", ["entry", "export_entry"])
def test_an_interrupt_while_the_cli_loads_says_nothing_was_done(entry: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", INTERRUPT_WHILE_LOADING.format(entry=entry)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == INTERRUPTED and proc.stdout == ""


def test_import_rrise_loads_nothing_heavy_but_every_name_still_works() -> None:
    code = (
        "import sys, rrise\n"
        "assert 'numpy' not in sys.modules and 'rrise.bundle' not in sys.modules, sorted(sys.modules)\n"
        "from rrise import Bundle, BundleError, certify_from_probs, RECORD_KEYS\n"
        "import rrise.bundle\n"
        "assert rrise.Bundle is rrise.bundle.Bundle and issubclass(BundleError, Exception)\n"
        "assert callable(certify_from_probs) and 'radius' in RECORD_KEYS\n"
        "assert set(rrise.__all__) <= set(dir(rrise))\n"
        "try:\n    rrise.nope\nexcept AttributeError as e:\n    print(e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "has no attribute 'nope'" in proc.stdout


@pytest.fixture(scope="module")
def run_args(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    import cv2
    import numpy as np

    from tests.tiny_bundle import linear_sources, make_linear_bundle

    root = tmp_path_factory.mktemp("interrupt")
    make_linear_bundle(linear_sources(root), root / "bundle")
    frames = root / "frames"
    frames.mkdir()
    for i in range(3):
        cv2.imwrite(str(frames / f"f{i}.png"), np.full((8, 8), 40 * i, np.uint8))
    out = root / "records.jsonl"
    return ["run", "--bundle", str(root / "bundle"), "--source", str(frames), "--jsonl", str(out)]


@pytest.mark.parametrize("how", ["console-script", "python-m"])
def test_ctrl_c_0_2_s_after_start_is_a_message_not_a_traceback(how: str, run_args: list[str]) -> None:
    script = Path(sys.executable).with_name("rrise")
    cmd = [str(script)] if how == "console-script" else [sys.executable, "-m", "rrise"]
    for _ in range(3):
        proc = subprocess.Popen([*cmd, *run_args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        if "init_import_site" not in err:
            break  # else the signal came inside Python's own start-up, before any of rrise ran: again
    assert "Traceback" not in err, err
    if err == INTERRUPTED:  # the signal came while the CLI loaded (on a 2-core machine: always)
        assert proc.returncode == 130
    else:  # a fast machine: the command had started and stopped by itself, with its own message
        assert proc.returncode in (0, 1, 130), err


EXEC_INTERRUPTED = """
import sys
from rrise.__main__ import _run


def main():
    try:
        exec("raise KeyboardInterrupt")  # as a Ctrl-C inside a dataclass being made
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\\n")
        raise SystemExit(130)


if __name__ == "__main__":
    {call}
"""


@pytest.mark.parametrize("guarded", [True, False])
def test_an_interrupt_through_exec_still_exits_130_under_python_m(guarded: bool, tmp_path: Path) -> None:
    call = "_run(main)" if guarded else "main()"
    (tmp_path / "interrupted_cli.py").write_text(EXEC_INTERRUPTED.format(call=call))
    proc = subprocess.run(
        [sys.executable, "-m", "interrupted_cli"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.stderr == "error: interrupted\n"
    # unguarded, CPython kills itself by SIGINT at exit (the control: the guard is what gives 130)
    assert proc.returncode == (130 if guarded else -signal.SIGINT)


def test_a_ctrl_c_typer_swallows_while_parsing_still_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import typer.core

    from rrise.cli import main

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(typer.core.TyperGroup, "make_context", interrupted)
    with pytest.raises(SystemExit) as exc:
        main(["inspect", "--help"])
    assert exc.value.code == 130
    assert capsys.readouterr().err.strip() == "error: interrupted"
