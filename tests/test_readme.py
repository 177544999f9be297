"""The README's commands exist, its links resolve, and its quick start and own-model blocks run.

**Which commands.** Every ``rrise …`` and ``rrise-export …`` command in README.md: each line of a
``bash``/``sh``/``console``/unlabelled code block whose first word is ``rrise`` or ``rrise-export``,
or that runs ``-m rrise`` (``python -m rrise …``, ``torchrun … -m rrise …``), after joining ``\\``
line continuations and dropping ``# comments``; and every inline code span that starts with one.

**Placeholders.** A command is the run of leading words that name sub-commands (``rrise export
build``); every other word is either a flag (it starts with ``-`` and is not a number or ``-``
alone, stdout) or a value. Values are never checked, so example paths (``runs/fm``, ``model.onnx``),
capitalised placeholders (``MODEL``, ``DIR``, ``KEY.pub``) and ``…`` need no substitution to be
parsed. ``rrise-export`` is checked as ``rrise export``, the same app mounted in ``rrise``.

**The check.** ``rrise <command> --help`` run in-process (typer's CliRunner against
``rrise.cli.app``) exits 0 and lists every flag the README gives that command.

**The end-to-end test** (``integration``) runs, through ``rrise.cli.main`` as the console does, the
quick start's ``rrise demo`` line on scikit-learn's digits (every profile shrinks to fit it), and
the "Your own model" block's ``rrise build`` lines for an ONNX model (folder and ``.npz``) at the
``smoke`` profile, on a tiny ONNX classifier and image set written here; then the deploy section's
``rrise run … --jsonl -`` line on the bundle. The ``.pt2`` and factory forms are only parsed here;
tests/calibrate/test_own_model_e2e.py builds them on real data.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rrise.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "benchmarks").rglob("README.md"))]
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}
ENTRIES = {"rrise": [], "rrise-export": ["export"]}  # the entry → its path in rrise.cli.app

runner = CliRunner()


# --- extraction ------------------------------------------------------------------------------------
def code_blocks(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced code block."""
    return [(m[1].strip().lower(), m[2]) for m in re.finditer(r"^```([^\n`]*)\n(.*?)^```", text, re.M | re.S)]


def shell_lines(body: str) -> list[str]:
    """The block's lines with ``\\`` continuations joined."""
    return body.replace("\\\n", " ").splitlines()


def rrise_words(line: str) -> list[str] | None:
    """The command's words from its entry on (``["rrise", "run", "--bundle", …]``), comments
    dropped; None when the line is not an ``rrise``/``rrise-export`` command."""
    try:
        words = shlex.split(line.replace("…", "..."), comments=True)
    except ValueError:  # an unbalanced quote: not a shell command
        return None
    for i, word in enumerate(words):
        if i == 0 and word in ENTRIES:
            return words
        if word == "rrise" and i > 0 and words[i - 1] == "-m":
            return words[i:]
    return None


def readme_commands(text: str) -> list[list[str]]:
    """Every rrise command in code blocks and inline code spans, in the order they appear."""
    found = []
    for lang, body in code_blocks(text):
        if lang in SHELL_BLOCKS:
            found += [w for w in map(rrise_words, shell_lines(body)) if w]
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", prose):
        span = " ".join(span.split())  # a span may run over a line break
        if " " in span and (span.split(" ", 1)[0] in ENTRIES or "-m rrise " in span):
            words = rrise_words(span)
            found += [words] if words else []
    return found


def is_flag(word: str) -> bool:
    return word.startswith("-") and word != "-" and not re.match(r"-\.?\d", word)


def split_command(words: list[str]) -> tuple[list[str], list[str]]:
    """``(path in rrise.cli.app, flags)``: the sub-commands named before the first flag or value."""
    import typer

    path = list(ENTRIES[words[0]])
    node = typer.main.get_command(app)
    for name in path:
        node = node.commands[name]
    rest = words[1:]
    while rest and not is_flag(rest[0]) and rest[0] in getattr(node, "commands", {}):
        node = node.commands[rest[0]]
        path.append(rest.pop(0))
    takes_arguments = any(p.param_type_name == "argument" for p in node.params)
    if rest and not is_flag(rest[0]) and hasattr(node, "commands") and not takes_arguments:
        path.append(rest[0])  # a group that takes no arguments: this word must name a sub-command
    return path, [w.split("=", 1)[0] for w in rest if is_flag(w)]


def help_text(path: list[str]) -> tuple[int, str]:
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    return result.exit_code, result.output


COMMANDS = readme_commands(README.read_text())


def test_the_readme_shows_the_commands_a_newcomer_needs() -> None:
    shown = {" ".join(split_command(w)[0]) for w in COMMANDS}
    for needed in ("demo", "build", "run", "subscribe", "inspect", "export", "keys", "calibrate"):
        assert needed in shown, f"the README shows no `rrise {needed}` command"
    flags = {f for w in COMMANDS for f in split_command(w)[1]}
    for needed in ("--record", "--foxglove", "--trust", "--engine", "--precision", "--jsonl"):
        assert needed in flags, f"the README never uses {needed}"


@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(w)[:70] for w in COMMANDS])
def test_every_readme_command_and_flag_exists(words: list[str]) -> None:
    path, flags = split_command(words)
    code, text = help_text(path)
    shown = " ".join(words)
    assert code == 0, f"`{shown}`: `rrise {' '.join(path)} --help` failed:\n{text}"
    missing = [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text)]
    assert not missing, f"`{shown}`: `rrise {' '.join(path)} --help` does not list {missing}"


def test_the_extraction_handles_continuations_comments_and_entries() -> None:
    text = "```bash\nrrise run --bundle B \\\n    --source 0  # --not-a-flag\n" + (
        "torchrun --nproc-per-node 2 -m rrise targets --workdir DIR\npython examples/x.py --out y\n```\n"
        "Prose with `rrise-export --bundle B --precision int8` and `rrise.Bundle.load(path)`.\n"
    )
    commands = readme_commands(text)
    assert commands == [
        ["rrise", "run", "--bundle", "B", "--source", "0"],
        ["rrise", "targets", "--workdir", "DIR"],
        ["rrise-export", "--bundle", "B", "--precision", "int8"],
    ]
    assert split_command(commands[0]) == (["run"], ["--bundle", "--source"])
    assert split_command(commands[2]) == (["export"], ["--bundle", "--precision"])
    assert split_command(["rrise", "export", "build", "--out", "x"]) == (["export", "build"], ["--out"])
    assert split_command(["rrise", "nonesuch", "--x"])[0] == ["nonesuch"]
    assert split_command(["rrise-export", "nonesuch", "--out", "x"])[0] == ["export", "nonesuch"]
    assert split_command(["rrise", "inspect", "BUNDLE", "--json"]) == (["inspect"], ["--json"])
    assert help_text(["nonesuch"])[0] != 0  # a command that does not exist fails the check


def test_the_readme_is_short_and_in_a_newcomers_order() -> None:
    """What it is, the guarantee, quick start, your own model, deploy, results, links, development."""
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    order = ["What the certificate promises", "Quick start", "Your own model", "Deploy", "Results"]
    order += ["Documentation", "Development"]
    headings = re.findall(r"^## (.+)$", re.sub(r"^```.*?^```", "", text, flags=re.M | re.S), re.M)
    assert headings == order

    # the guarantee is quoted as the bundle states it (rrise.bundle.GUARANTEE), in the README's notation
    from rrise.bundle import GUARANTEE

    quote = " ".join(line[2:] for line in text.splitlines() if line.startswith("> "))
    for readme, bundle in (("`1 − α − β`", "1 - alpha - beta"), ("ℓ2", "l2")):
        quote = quote.replace(readme, bundle)
    assert quote.startswith("If the calibration inputs") and quote.rstrip(".") in GUARANTEE


def test_the_quick_start_demo_line_is_what_make_demo_runs() -> None:
    """The README's `rrise demo` line is the Makefile's demo recipe with its defaults filled in."""
    makefile = (ROOT / "Makefile").read_text()
    defaults = dict(re.findall(r"^(\w+)\s*\?=\s*(\S+)\s*$", makefile, re.M))
    recipe = re.search(r"\$\(BIN\)/(rrise demo [^\n]*)", makefile)
    assert recipe, "the Makefile's demo target no longer runs rrise demo"
    made = re.sub(r"\$\((\w+)\)", lambda m: defaults[m[1]], recipe[1]).replace("$$ds", "fashion-mnist")
    (demo,) = [w for w in readme_commands(README.read_text()) if w[:2] == ["rrise", "demo"] and len(w) > 2]
    assert demo == shlex.split(made)


# --- links -----------------------------------------------------------------------------------------
def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    return {slug(h) for h in re.findall(r"^#+\s+(.+?)\s*$", text, re.M)}


def relative_links(path: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_every_relative_link_points_to_an_existing_file(doc: Path) -> None:
    broken = []
    for link in relative_links(doc):
        target, _, anchor = link.partition("#")
        dest = (doc.parent / target).resolve() if target else doc
        if not dest.exists():
            broken.append(link)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{link} (no such heading)")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links {broken}"


# --- numbers the README derives from the code ------------------------------------------------------
def test_the_readme_cost_per_profile_is_what_rrise_build_plans(tmp_path: Path) -> None:
    """The base-model evaluations `rrise build` announces (rrise.calibrate.build_cost.mc_budget) for a
    data set that fills each profile's splits, with the surrogate a copy of the user's model (so with
    the profile's distil-first votes), as the README quotes them."""
    from types import SimpleNamespace

    pytest.importorskip("torch")
    from rrise.calibrate.build_cost import mc_budget
    from rrise.calibrate.profiles import PROFILES

    text = " ".join(README.read_text().split())
    for name in ("quick", "medium", "full"):
        p = PROFILES[name]
        sizes = {"targets": p.n_targets, "selection": p.n_selection, "rules": p.n_rule}
        sizes.update(calibration=p.m, test=p.n_test)
        splits = {k: list(range(n)) for k, n in sizes.items()}
        w = SimpleNamespace(prof=p, splits=lambda s=splits: s, root=tmp_path)
        total = sum(mc_budget(w, p.distil_steps).values())
        assert f"{name} {total:,}" in text, f"the README's cost for {name} is not {total:,}"


# --- end to end ------------------------------------------------------------------------------------
def _block_after(heading: str, text: str) -> str:
    """The text of the README section under ``heading`` (up to the next heading of its level)."""
    level, _, title = heading.partition(" ")
    match = re.search(
        rf"^{re.escape(level)} {re.escape(title)}\n(.*?)(?=^{re.escape(level)} |\Z)", text, re.M | re.S
    )
    assert match, f"the README has no section {heading!r}"
    return match[1]


def _section_commands(heading: str, entry_word: str) -> list[list[str]]:
    section = _block_after(heading, README.read_text())
    return [w for w in readme_commands(section) if len(w) > 1 and w[1] == entry_word]


def _run_cli(argv: list[str], capsys) -> str:
    """``rrise ARGV`` through the console entry's own argument handling; its output."""
    from rrise.cli import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    out = capsys.readouterr()
    assert stop.value.code in (0, None), (
        f"rrise {' '.join(argv)} exited {stop.value.code}:\n{out.out}{out.err}"
    )
    return out.out + out.err


def _user_files(root: Path) -> dict[str, Path]:
    """A tiny ImageFolder and .npz (8×8 colour digits the model did not train on) and a small
    ONNX classifier trained for a few seconds on other digits."""
    import warnings

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    torch = pytest.importorskip("torch")
    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    held, train = order[:600], order[600:]
    pixels = (d.images * (255 / 16)).astype(np.uint8)  # 8×8
    rgb = np.repeat(pixels[..., None], 3, axis=-1)
    folder = root / "images"
    for i in held:
        (folder / f"digit{d.target[i]}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb[i]).save(folder / f"digit{d.target[i]}" / f"{i:04d}.png")
    np.savez(root / "images.npz", images=rgb[held], labels=d.target[held])

    x = torch.tensor(rgb[train].transpose(0, 3, 1, 2) / 255.0, dtype=torch.float32)
    y = torch.tensor(d.target[train])
    torch.manual_seed(0)
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(8 * 4 * 4, 10))  # fmt: skip
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(8):
        for b in torch.randperm(len(x)).split(100):
            loss = nn.functional.cross_entropy(net(x[b] + 0.25 * torch.randn_like(x[b])), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), (torch.zeros(1, 3, 8, 8),), str(root / "model.onnx"), dynamo=False,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "b"}, "logits": {0: "b"}})  # fmt: skip
    return {"model.onnx": root / "model.onnx", "images/": folder, "images.npz": root / "images.npz"}


@pytest.mark.integration
def test_quick_start_and_own_model_blocks_run_at_smoke_sizes(tmp_path: Path, capsys) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("cv2")
    from rrise import Bundle

    # Quick start: the line `make demo` runs, on digits instead of Fashion-MNIST.
    (demo,) = _section_commands("## Quick start", "demo")
    swap = {"runs/demo": str(tmp_path / "demo"), "fashion-mnist": "digits"}
    out = _run_cli([swap.get(w, w) for w in demo[1:]] + ["--no-progress"], capsys)
    assert "Certified accuracy" in out
    Bundle.load(tmp_path / "demo" / "bundle")

    # Your own model: every ONNX `rrise build` line, on the files written here, at smoke sizes.
    files = _user_files(tmp_path)
    builds = [w for w in _section_commands("## Your own model", "build") if "model.onnx" in w]
    assert {w[w.index("--data") + 1] for w in builds} == {"images/", "images.npz"}
    for k, words in enumerate(builds):
        swap = {**{name: str(path) for name, path in files.items()}, "runs/mine": str(tmp_path / f"mine{k}")}
        out = _run_cli([swap.get(w, w) for w in words[1:]] + ["--profile", "smoke", "--no-progress"], capsys)
        assert out.strip().splitlines()[-1] == str(tmp_path / f"mine{k}" / "bundle")
        Bundle.load(tmp_path / f"mine{k}" / "bundle")

    # Deploy: the README's JSON-lines run, on that bundle and a folder of the images.
    (run,) = [w for w in _section_commands("### Run (edge)", "run") if "--jsonl" in w and "clip.mp4" in w]
    swap = {
        "runs/fm/bundle": str(tmp_path / "mine0" / "bundle"),
        "clip.mp4": str(files["images/"] / "digit3"),
    }
    out = _run_cli([swap.get(w, w) for w in run[1:]] + ["--max-frames", "5"], capsys)
    assert out.count('"radius"') >= 5


# --- benchmark and study commands --------------------------------------------------------------------
def benchmark_commands(text: str) -> list[list[str]]:
    """Every ``python -m benchmarks[.studies] …`` command in code blocks and inline spans."""
    spans = [" ".join(s.split()) for s in re.findall(r"(?<!`)`([^`]+)`(?!`)", text)]
    lines = [ln for lang, body in code_blocks(text) if lang in SHELL_BLOCKS for ln in shell_lines(body)]
    found = []
    for line in spans + lines:
        match = re.search(r"python -m (benchmarks(?:\.studies)?)\b(.*)", line)
        if match:
            found.append([match[1], *shlex.split(match[2].split("#")[0].replace("…", "..."))])
    return found


def is_placeholder(word: str) -> bool:
    """``NAME``, ``[NAME``, ``...]``, ``W``: capitals, brackets and dots stand for a value."""
    return bool(re.fullmatch(r"[\[(]*[A-Z_.]*[A-Z.][A-Z_.]*[\])]*|[\[(]*\.\.\.[\])]*", word))


def test_every_benchmark_and_study_command_in_the_docs_exists() -> None:
    from benchmarks.__main__ import available as benches
    from benchmarks.studies.__main__ import available as studies

    names = {"benchmarks": benches(), "benchmarks.studies": studies()}
    commands = [c for doc in DOCS for c in benchmark_commands(doc.read_text())]
    assert any(c[0] == "benchmarks.studies" for c in commands) and any(c[0] == "benchmarks" for c in commands)
    for module, *args in commands:
        named = [a for a in args if not a.startswith("-") and not is_placeholder(a)]
        if module == "benchmarks.studies" and named:
            assert named[0] in names[module], f"`python -m {module} {' '.join(args)}`: no such study"
        elif module == "benchmarks":
            assert all(a in names[module] for a in named[:1]), f"`python -m benchmarks {' '.join(args)}`"


def test_python_m_benchmarks_runs_the_product_benchmarks_only() -> None:
    """The default run is every bench_*.py but the long ones; the studies are not among them."""
    from benchmarks.__main__ import available, by_default, parse
    from benchmarks.studies.__main__ import available as studies

    assert {"full_profile", "own_model"} <= set(available())
    assert {"mc", "export", "runtime", "ood"} <= set(by_default())
    assert not {"full_profile", "own_model"} & set(by_default())
    assert not set(studies()) & set(available())
    assert {"allocation_ceiling", "fresh_targets", "rules_on_selection"} <= set(studies())
    assert parse(["mc", "--quick", "runtime"], available()) == [("mc", ["--quick"]), ("runtime", [])]
    assert "unknown benchmark" in parse(["rules_on_selection"], available())


@pytest.mark.parametrize("name", ["allocation_ceiling", "fresh_targets", "rules_on_selection"])
def test_each_study_has_the_benchmark_contract(name: str, capsys) -> None:
    """``main(argv) -> dict``, with its own --help; the runner takes ``--out`` for itself."""
    import importlib
    import inspect

    from benchmarks.studies.__main__ import split_out

    module = importlib.import_module(f"benchmarks.studies.{name}")
    assert inspect.signature(module.main).return_annotation in (dict, "dict")
    with pytest.raises(SystemExit) as stop:
        module.main(["--help"])
    assert stop.value.code == 0 and f"benchmarks.studies {name}" in capsys.readouterr().out
    assert split_out(["--workdir", "W", "--out", "x.json"]) == (Path("x.json"), ["--workdir", "W"])
