"""A consumer in another process: subscribe to a running ``rrise run --publish`` and use records.

    rrise run --bundle runs/demo/bundle --source 0 --publish tcp://*:5555     # on the robot
    python examples/subscriber.py tcp://robot:5555                           # anywhere else

The subscription reconnects by itself when the runtime restarts, skips (and counts) malformed
messages or records of another schema version, and counts records it missed (gaps in ``seq``,
e.g. when this process stalled and the publisher dropped records for it alone). With
``--status`` it also prints the runtime's periodic health records.
"""

from __future__ import annotations

import argparse

from rrise import subscribe


def main() -> None:
    ap = argparse.ArgumentParser(description="Print certified records from a running rrise runtime.")
    ap.add_argument("endpoint", help="e.g. tcp://127.0.0.1:5555 or ipc:///tmp/rrise.sock")
    ap.add_argument("--count", type=int, default=None, help="stop after this many frame records")
    ap.add_argument("--timeout", type=float, default=None, help="stop after this many quiet seconds")
    ap.add_argument("--status", action="store_true", help="also print status records")
    args = ap.parse_args()

    stats: dict[str, int] = {}
    frames = 0
    with subscribe(args.endpoint, timeout_s=args.timeout, stats=stats, status=args.status) as records:
        for r in records:
            if r.get("kind") == "status":
                print(
                    f"[status] {r['fps']:.1f} fps, drops {r['drops']}, errors {r['errors']}, "
                    f"abstain {r['abstain_rate']}, p50/p99 {r['latency_p50_ms']}/{r['latency_p99_ms']} ms, "
                    f"alarm {r['alarm']}, source {r['source_state']}"
                )
                continue
            frames += 1
            if r["error"] is not None:
                verdict = f"error: {r['error']}"
            elif r["abstain"]:
                verdict = "abstain"
            else:
                verdict = f"{r['label']} certified within radius {r['radius']:.3f}"
            alarm = f"  ALARM {r['alarm']}" if r["alarm"] else ""
            print(f"#{r['seq']} frame {r['frame']} ({r['latency_ms']:.1f} ms): {verdict}{alarm}")
            if args.count is not None and frames >= args.count:
                break
    print(f"received {stats['received']}, missed {stats['missed']}, malformed {stats['malformed']}")


if __name__ == "__main__":
    main()
