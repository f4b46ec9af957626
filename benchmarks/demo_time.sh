#!/usr/bin/env bash
# Benchmark (a): wall time of the demo, cold (world not cached: trains every model) and warm (world cached), as a
# new user runs it (`make demo`: the default worlds, no TOFU files, the three parts side by side on 2+ cores).
# Usage: bash benchmarks/demo_time.sh [OUT] [extra `obliviate demo` options, e.g. --tofu-dir DIR or --jobs 1]
# (from the repository root, with the package installed: `obliviate` on PATH, or `make install`'s .venv). Uses a
# fresh cache; keeps the two demo folders in OUT/cold and OUT/warm when OUT is given.
set -euo pipefail
command -v obliviate >/dev/null || PATH="$PWD/.venv/bin:$PATH"
out=${1:-}
shift || true
keep=$out
[ -n "$out" ] || out=$(mktemp -d)
mkdir -p "$out"
cache=$(mktemp -d)
export OBLIVIATE_CACHE=$cache
start=$(date +%s); obliviate demo --quiet --out "$out/cold" "$@" >"$out/cold.log"; cold=$(( $(date +%s) - start ))
start=$(date +%s); obliviate demo --quiet --out "$out/warm" "$@" >"$out/warm.log"; warm=$(( $(date +%s) - start ))
python3 - "$out/cold/summary.json" "$out/warm/summary.json" "$cold" "$warm" <<'PY'
import json, sys
cold, warm = (json.load(open(p)) for p in sys.argv[1:3])
builds = {"profiles": cold.get("world_build_seconds")}
builds.update({"canvas": s.get("world_build_seconds") for s in cold.get("t2i", [])[:1]})
builds.update({"portraits": cold["mllm"]["world_build_seconds"]} if "mllm" in cold else {})
def numbers(card):  # every number but the timings
    return {m: {k: v for k, v in row.items() if not k.endswith("seconds")} for m, row in card.items()}
same = numbers(cold["scorecard"]) == numbers(warm["scorecard"]) and [
    numbers(s["scorecard"]) for s in cold.get("t2i", [])] == [numbers(s["scorecard"]) for s in warm.get("t2i", [])] and (
    numbers(cold.get("mllm", {}).get("scorecard", {})) == numbers(warm.get("mllm", {}).get("scorecard", {})))
print(json.dumps({"cold_seconds": int(sys.argv[3]), "warm_seconds": int(sys.argv[4]),
                  "world_build_seconds_cold": builds, "same_scorecards_cold_and_warm": same}, indent=2))
PY
rm -rf "$cache"
[ -n "$keep" ] || rm -rf "$out"
