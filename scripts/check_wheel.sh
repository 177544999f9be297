#!/usr/bin/env bash
# Build the wheel, install it in a fresh venv with the runtime extra only (no torch), and run it:
# `rrise --help`, `rrise inspect` and `rrise run` on a small bundle made by the dev environment.
set -euo pipefail
dev_python=${1:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$dev_python" -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" .
wheel=$(ls "$work"/dist/rrise-*.whl)
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "${wheel}[runtime]"

"$work/venv/bin/python" - <<'PY'
import importlib.util
import rrise, rrise.runtime
assert importlib.util.find_spec("torch") is None, "the runtime venv must not contain torch"
print("wheel imports: rrise", rrise.__version__, "with rrise.runtime, without torch")
PY
"$work/venv/bin/rrise" --help >/dev/null

"$dev_python" -m tests.tiny_bundle "$work/bundle" "$work/frames"
"$work/venv/bin/rrise" inspect "$work/bundle" >/dev/null
"$work/venv/bin/rrise" run --bundle "$work/bundle" --source "$work/frames" --jsonl "$work/records.jsonl" 2>/dev/null
lines=$(wc -l < "$work/records.jsonl")
[ "$lines" -gt 0 ] || { echo "the installed wheel wrote no records"; exit 1; }
echo "wheel check: ok (installed wheel certified $lines frames without torch)"
