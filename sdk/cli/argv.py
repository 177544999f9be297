"""What the command line is rewritten into before typer parses it: ``--mean 0.4 0.5 0.6`` as
repeated options, and ``--foxglove`` with no value as its default address (click options take
exactly one value)."""

from __future__ import annotations

from rrise.runtime.options import FOXGLOVE_DEFAULT

__all__ = ["FOXGLOVE_DEFAULT", "VECTOR_OPTIONS", "optional_values", "spread_vector_options"]

VECTOR_OPTIONS = ("--mean", "--std")


def spread_vector_options(argv: list[str]) -> list[str]:
    """``--mean 0.4 0.5 0.6`` → ``--mean 0.4 --mean 0.5 --mean 0.6`` (click options take one value).

    >>> spread_vector_options(["build", "--mean", "0.4", "0.5", "--std", "0.2"])
    ['build', '--mean', '0.4', '--mean', '0.5', '--std', '0.2']
    """
    out: list[str] = []
    option, taken = None, 0
    for arg in argv:
        if option is not None and not arg.startswith("-") and _is_number(arg):
            out += [option, arg]
            taken += 1
            continue
        if option is not None and taken == 0:
            out.append(option)  # no number followed: let the parser say what is missing
        option, taken = (arg, 0) if arg in VECTOR_OPTIONS else (None, 0)
        if option is None:
            out.append(arg)
    if option is not None and taken == 0:
        out.append(option)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", " ").split()[0])
    except (ValueError, IndexError):
        return False
    return True


def optional_values(argv: list[str]) -> list[str]:
    """``--foxglove`` with no value (last, or before another option) → ``--foxglove 127.0.0.1:8765``.

    >>> optional_values(["run", "--foxglove", "--jsonl", "-"])
    ['run', '--foxglove', '127.0.0.1:8765', '--jsonl', '-']
    """
    out: list[str] = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg == "--foxglove" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            out.append(FOXGLOVE_DEFAULT)
    return out
