"""Compare two demo summaries number for number (issue 18, section 0: a refactor must not change a single number).

    python benchmarks/same_summary.py BEFORE/summary.json AFTER/summary.json

Wall-clock fields (seconds, items per second, dates) are skipped: they measure the machine, not the method. Prints how
many numbers were compared and every difference (a value, or a key one side lacks); exits 1 on a value difference."""
from __future__ import annotations

import json
import sys

TIMING = ("seconds", "wall", "per_second", "created", "started", "finished", "duration")


def differences(before, after, path: str = "") -> tuple[int, list[tuple]]:
    """(numbers compared, [(path, before, after)]): a key one side lacks has the value "missing"."""
    compared, found = 0, []
    if isinstance(before, dict) and isinstance(after, dict):
        for key in sorted(set(before) | set(after)):
            if any(t in key for t in TIMING):
                continue
            if key not in before or key not in after:
                found.append((f"{path}/{key}", before.get(key, "missing"), after.get(key, "missing")))
                continue
            n, more = differences(before[key], after[key], f"{path}/{key}")
            compared, found = compared + n, found + more
    elif isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        for i, (b, a) in enumerate(zip(before, after)):
            n, more = differences(b, a, f"{path}[{i}]")
            compared, found = compared + n, found + more
    else:
        compared += isinstance(before, (int, float)) and not isinstance(before, bool)
        if before != after:
            found.append((path, before, after))
    return compared, found


if __name__ == "__main__":
    before, after = (json.load(open(p)) for p in sys.argv[1:3])
    compared, found = differences(before, after)
    print(f"{compared} numbers compared, {len(found)} differences")
    for item in found:
        print(*item)
    sys.exit(1 if any("missing" not in item[1:] for item in found) else 0)
