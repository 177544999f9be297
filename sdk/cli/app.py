"""The ``rrise`` typer app and what every command shares: one-line errors, SDK logs on stderr, and
Ctrl-C/SIGTERM turned into a message and exit 130."""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import typer
from typer.core import TyperGroup, TyperOption

__all__ = ["COMMAND_ORDER", "app", "fail", "interrupt_reported", "messages_not_tracebacks"]

# `rrise --help` lists the commands in the order a user runs them, then the tools around a bundle.
COMMAND_ORDER = (
    "demo",
    "build",
    "train-base",
    "targets",
    "train-surrogate",
    "select-rule",
    "calibrate",
    "cohen",
    "certify",
    "train-baseline",
    "reference",
    "evaluate",
    "export",
    "inspect",
    "run",
    "subscribe",
    "audit",
)


class PipelineOrderGroup(TyperGroup):
    """Commands in :data:`COMMAND_ORDER`, any other after them in the order they were added."""

    def list_commands(self, ctx: typer.Context) -> list[str]:
        names = super().list_commands(ctx)
        rank = {name: i for i, name in enumerate(COMMAND_ORDER)}
        return sorted(names, key=lambda n: (rank.get(n, len(rank)), names.index(n)))


def _flags_without_metavar() -> None:
    """A flag takes no value, so --help shows no `<bool>` type beside it (typer shows one)."""
    shown = TyperOption.display_type_rich

    def display_type_rich(self: TyperOption, ctx: typer.Context) -> str | None:
        return None if self.is_flag and self.metavar is None else shown(self, ctx)

    TyperOption.display_type_rich = display_type_rich


_flags_without_metavar()

app = typer.Typer(
    name="rrise",
    cls=PipelineOrderGroup,
    help="Certified-robust image classification: randomized smoothing with a calibrated surrogate.\n\n"
    "Example: `rrise demo --profile quick`, then `rrise COMMAND --help` for each step.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
    add_completion=False,
)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: message`` in red on stderr; return the exit to raise."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


class _OneLineFormatter(logging.Formatter):
    """``warning: message``: a log line for a person, never a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


@contextlib.contextmanager
def _logging_to_stderr() -> Iterator[None]:
    """The SDK's info and warnings (retries, subscribers, records that went nowhere) on stderr."""
    logger = logging.getLogger("rrise")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter())
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


# Set when a command has said it was interrupted; typer turns any other Ctrl-C into a silent exit 130.
interrupt_reported: list[bool] = []


def messages_not_tracebacks(command: Callable[..., Any]) -> Callable[..., Any]:
    """For long-running commands: SDK logs on stderr, and SIGINT/SIGTERM before the command takes
    them over (while the bundle loads, the source opens…) end it with a message and exit 130."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
        try:
            with _logging_to_stderr():
                return command(*args, **kwargs)
        except KeyboardInterrupt:
            interrupt_reported.append(True)
            raise fail("interrupted: stopped before the end; every output opened was closed", 130) from None
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)

    return wrapper
