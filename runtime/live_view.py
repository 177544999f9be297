"""``rrise run --foxglove [HOST:PORT]``: the frames, records and status of a run, live, through the
Foxglove WebSocket protocol (served by ``foxglove-sdk``; open it in the Foxglove app with
*Open connection → Foxglove WebSocket → ws://HOST:PORT*).

The channels are those of :mod:`rrise.runtime.foxglove_channels` (with the adaptive keys declared
in an adaptive run); each status record is also sent
as a Foxglove status message (shown in the app's problems list: a warning on a shift alarm or
unreadable frames, an error while the source is not delivering). Nothing is queued for a client
that is not there, and a slow client loses the oldest messages, never slowing inference.
"""

from __future__ import annotations

import logging
from typing import Any

from .extras import require
from .foxglove_channels import FoxgloveChannels
from .status_text import status_level, status_line

__all__ = ["DEFAULT_ADDRESS", "FoxgloveLiveView", "parse_address"]

log = logging.getLogger("rrise.runtime")

DEFAULT_ADDRESS = "127.0.0.1:8765"
BACKLOG = 64  # messages buffered per client before the oldest are dropped
EVERY_INTERFACE = ("0.0.0.0", "::", "[::]", "*")


def parse_address(spec: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT``, ``PORT`` or ``HOST`` (port 8765) → ``(host, port)``; port 0: any
    free port. ValueError naming the option otherwise."""
    text = (spec or DEFAULT_ADDRESS).strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = ("", text) if text.isdigit() else (text, "8765")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--foxglove {spec!r}: expected HOST:PORT, e.g. 0.0.0.0:8765")
    return host or "127.0.0.1", int(port)


class FoxgloveLiveView:
    """A Foxglove WebSocket server for one run; :attr:`url` is where it listens. ``adaptive``: the
    run's records carry the adaptive keys (``--mc-budget`` > 0)."""

    def __init__(self, spec: str = DEFAULT_ADDRESS, *, adaptive: bool = False) -> None:
        fg = require("foxglove", "--foxglove")
        host, port = parse_address(spec)
        self._context = fg.Context()
        try:
            self._server = fg.start_server(
                name="rrise", host=host, port=port, context=self._context, message_backlog_size=BACKLOG
            )
        except Exception as exc:  # the SDK raises its own error type for a port in use
            raise ValueError(f"--foxglove {spec}: cannot serve on {host}:{port}: {exc}") from None
        self.url = f"ws://{host}:{self._server.port}"
        if host in EVERY_INTERFACE:
            log.warning(
                "--foxglove %s serves every frame and record on every interface, to anyone who can "
                "reach this machine (the Foxglove WebSocket protocol has no authentication): bind one "
                "interface (127.0.0.1, or the robot network's address) unless the network is trusted",
                spec,
            )
        self._channels = FoxgloveChannels(self._context, adaptive=adaptive)
        self._levels = {
            "ok": fg.StatusLevel.Info,
            "warning": fg.StatusLevel.Warning,
            "error": fg.StatusLevel.Error,
        }
        self._last: dict[str, Any] | None = None
        log.info("Foxglove live view on %s", self.url)

    @property
    def port(self) -> int:
        return self._server.port

    def write(self, record: dict[str, Any], jpeg: bytes | None, width: int) -> None:
        self._channels.log(record, jpeg, width)
        self._last = record

    def write_status(self, status: dict[str, Any]) -> None:
        self._channels.log_status(status)
        level = self._levels[status_level(status)]
        self._server.publish_status(status_line(status, self._last), level, id="rrise")

    def close(self) -> None:
        if self._server is not None:
            self._channels.close()
            self._server.stop()
            self._server = None
