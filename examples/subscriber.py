"""A consumer in another process: subscribe to a running ``rrise run --publish`` and use records.

    rrise run --bundle runs/demo/bundle --source 0 --publish tcp://192.168.1.10:5555   # on the robot
    python examples/subscriber.py tcp://192.168.1.10:5555                            # anywhere else

With CURVE (``rrise keys robot --kind curve``; the robot runs with ``--curve-secret
robot.curve.key``), pass ``--curve-server-key robot.curve.pub``.

Every record this loop sees has been checked against the record schema (types, ranges,
consistency): malformed messages, records with a value of the wrong type and records of another
schema version are skipped and counted, never handed over. The subscription reconnects by itself
when the runtime restarts, and counts records it missed (gaps in ``seq``, e.g. when this process
stalled and the publisher dropped records for it alone). With ``--status`` it also prints the
runtime's periodic health records.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from rrise import subscribe


def describe(r: dict[str, Any]) -> str:
    """One line for a frame record (its fields are already validated by rrise.subscribe)."""
    if r["error"] is not None:
        verdict = f"error: {r['error']}"
    elif r["abstain"]:
        verdict = "abstain"
    else:
        verdict = f"{r['label']} certified within radius {r['radius']:.3f}"
    alarm = f"  ALARM {r['alarm']}" if r["alarm"] else ""
    return f"#{r['seq']} frame {r['frame']} ({r['latency_ms']:.1f} ms): {verdict}{alarm}"


def describe_status(s: dict[str, Any]) -> str:
    subscribers = "" if s.get("subscribers") is None else f", {s['subscribers']} subscriber(s)"
    return (
        f"[status] {s['fps']:.1f} fps, drops {s['drops']}, errors {s['errors']}, "
        f"abstain {s['abstain_rate']}, p50/p99 {s['latency_p50_ms']}/{s['latency_p99_ms']} ms, "
        f"alarm {s['alarm']}, source {s['source_state']}{subscribers}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description="Print certified records from a running rrise runtime.")
    ap.add_argument("endpoint", help="e.g. tcp://127.0.0.1:5555 or ipc:///tmp/rrise.sock")
    ap.add_argument("--count", type=int, default=None, help="stop after this many frame records")
    ap.add_argument("--timeout", type=float, default=None, help="stop after this many quiet seconds")
    ap.add_argument("--status", action="store_true", help="also print status records")
    ap.add_argument("--curve-server-key", default=None, help="the publisher's .curve.pub file")
    args = ap.parse_args()

    stats: dict[str, int] = {}
    frames = 0
    try:
        records = subscribe(
            args.endpoint,
            timeout_s=args.timeout,
            stats=stats,
            status=args.status,
            curve_server_key=args.curve_server_key,
        )
    except ValueError as exc:  # a bind address such as tcp://*:5555, or an unreadable key file
        print(f"error: {exc}", file=sys.stderr)
        return 1
    with records:
        try:
            for r in records:
                if r.get("kind") == "status":
                    print(describe_status(r))
                    continue
                frames += 1
                print(describe(r))
                if args.count is not None and frames >= args.count:
                    break
        except KeyboardInterrupt:
            pass
    print(f"received {stats['received']}, missed {stats['missed']}, malformed {stats['malformed']}")
    if stats["received"] == 0:
        print(f"received 0 records from {args.endpoint}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
