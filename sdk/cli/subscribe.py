"""``rrise subscribe``: print a running ``rrise run --publish``'s records as JSON lines; bound to
:class:`SubscribeOptions`."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from rrise.options import bind
from rrise.records import DEFAULT_TOPIC
from rrise.subscriber import DEFAULT_MAX_MESSAGE_BYTES

from .app import app, fail, messages_not_tracebacks

__all__ = ["SubscribeOptions"]


@dataclass(frozen=True, kw_only=True)
class SubscribeOptions:
    """``rrise subscribe``'s options."""

    endpoint: str = field(
        metadata={
            "help": "Publisher to connect to, e.g. tcp://127.0.0.1:5555 or tcp://robot:5555.",
            "argument": True,
        }
    )
    count: int | None = field(default=None, metadata={"help": "Exit after this many records."})
    timeout: float | None = field(
        default=None,
        metadata={
            "help": "Exit after this many seconds without a message; exit status 1 if no record came at all."
        },
    )
    topic: str = field(default=DEFAULT_TOPIC.decode(), metadata={"help": "Topic to subscribe to."})
    status: bool = field(
        default=False, metadata={"help": "Print the runtime's status records too (kind=status)."}
    )
    curve_server_key: Path | None = field(
        default=None,
        metadata={
            "help": "The publisher's CURVE public key file (NAME.curve.pub) when it runs with --curve-secret."
        },
    )
    max_message_size: int = field(
        default=DEFAULT_MAX_MESSAGE_BYTES,
        metadata={"help": "Refuse messages larger than this many bytes unread (a record is ~300 bytes)."},
    )

    def __post_init__(self) -> None:
        if self.count is not None and self.count < 1:
            raise ValueError(f"--count must be >= 1, got {self.count}")
        if self.timeout is not None and self.timeout < 0:
            raise ValueError(f"--timeout must be >= 0, got {self.timeout:g}")
        if self.max_message_size < 1024:
            raise ValueError(f"--max-message-size must be >= 1024, got {self.max_message_size}")


@app.command()
@messages_not_tracebacks
@bind(SubscribeOptions)
def subscribe(options: SubscribeOptions) -> None:
    """Print records from a running `rrise run --publish` as JSON lines.

    Reconnects by itself when the publisher restarts; skips and counts messages that are not valid
    records (wrong types, another schema version, garbage) and records lost on the way. Ends with
    "received N records from ENDPOINT" on stderr; with --timeout, exits 1 when nothing came.

    Example: `rrise subscribe tcp://127.0.0.1:5555 --count 10 --timeout 30`
    """
    from rrise.subscriber import subscribe as subscribe_records

    stats: dict[str, int] = {}
    try:
        records = subscribe_records(
            options.endpoint,
            topic=options.topic,
            timeout_s=options.timeout,
            stats=stats,
            status=options.status,
            max_message_bytes=options.max_message_size,
            curve_server_key=options.curve_server_key,
        )
    except (ValueError, RuntimeError) as exc:
        raise fail(str(exc)) from None
    interrupted = _print_records(records, options.count)
    typer.echo(_subscribe_report(options.endpoint, stats), err=True)
    if stats["received"] == 0 and not interrupted:
        raise typer.Exit(1)


def _print_records(records: Any, count: int | None) -> bool:
    """Write ``records`` as JSON lines until ``count`` of them (or the end); True if interrupted."""
    try:
        for n, record in enumerate(records, start=1):
            sys.stdout.write(json.dumps(record, default=_json_value) + "\n")
            sys.stdout.flush()
            if count is not None and n >= count:
                break
    except KeyboardInterrupt:
        return True
    finally:
        records.close()
    return False


def _json_value(value: Any) -> Any:
    """Record values JSON has no type for (bytes a newer publisher might add): hex text."""
    return value.hex() if isinstance(value, (bytes, bytearray)) else repr(value)


def _subscribe_report(endpoint: str, stats: dict[str, int]) -> str:
    """What `rrise subscribe` ends with: how many records came, and why none did when none did."""
    n = stats["received"]
    parts = [f"received {n} record{'' if n == 1 else 's'} from {endpoint}"]
    for key, what in (
        ("malformed", "malformed message(s) skipped"),
        ("missed", "record(s) missed (gaps in seq)"),
        ("restarts", "publisher restart(s)"),
    ):
        if stats.get(key):
            parts.append(f"{stats[key]} {what}")
    if n == 0 and stats.get("handshake_failures"):
        parts.append("the CURVE handshake failed: check --curve-server-key (does the publisher use CURVE?)")
    elif n == 0 and not stats.get("connects"):
        parts.append("never connected: is a publisher running there?")
    elif n == 0 and stats.get("disconnects"):
        parts.append("the connection closed: a message over --max-message-size is refused")
    return "; ".join(parts)
