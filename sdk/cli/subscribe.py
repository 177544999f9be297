"""``rrise subscribe``: print a running ``rrise run --publish``'s records as JSON lines."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from .app import app, fail, messages_not_tracebacks

__all__: list[str] = []


@app.command()
@messages_not_tracebacks
def subscribe(
    endpoint: Annotated[
        str, typer.Argument(help="Publisher to connect to, e.g. tcp://127.0.0.1:5555 or tcp://robot:5555.")
    ],
    count: Annotated[int | None, typer.Option(min=1, help="Exit after this many records.")] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="Exit after this many seconds without a message; exit status 1 if no record came at all.",
        ),
    ] = None,
    topic: Annotated[str, typer.Option(help="Topic to subscribe to.")] = "rrise",
    status: Annotated[
        bool, typer.Option("--status", help="Print the runtime's status records too (kind=status).")
    ] = False,
    curve_server_key: Annotated[
        Path | None,
        typer.Option(
            "--curve-server-key",
            help="The publisher's CURVE public key file (NAME.curve.pub) when it runs with --curve-secret.",
        ),
    ] = None,
    max_message_size: Annotated[
        int,
        typer.Option(
            min=1024, help="Refuse messages larger than this many bytes unread (a record is ~300 bytes)."
        ),
    ] = 16 * 1024,
) -> None:
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
            endpoint,
            topic=topic,
            timeout_s=timeout,
            stats=stats,
            status=status,
            max_message_bytes=max_message_size,
            curve_server_key=curve_server_key,
        )
    except (ValueError, RuntimeError) as exc:
        raise fail(str(exc)) from None
    interrupted = False
    try:
        for n, record in enumerate(records, start=1):
            sys.stdout.write(json.dumps(record, default=_json_value) + "\n")
            sys.stdout.flush()
            if count is not None and n >= count:
                break
    except KeyboardInterrupt:
        interrupted = True
    finally:
        records.close()
    typer.echo(_subscribe_report(endpoint, stats), err=True)
    if stats["received"] == 0 and not interrupted:
        raise typer.Exit(1)


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
