"""Print a pip constraints file that pins every dependency of pyproject.toml (the core ones and those of the extras
named on the command line) to its lowest declared version, `name==X` for `name>=X`: pip's way to what other
resolvers call a lowest-direct resolution. The dependencies of the dependencies resolve as pip chooses."""
from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib  # novermin (tomli below on 3.10)
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def lowest_pins(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    specs, todo, seen = list(project["dependencies"]), list(extras), set()
    while todo:  # extras may name other extras: obliviate[t2i,mllm]
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        if extra not in optional:
            sys.exit(f"pyproject.toml has no extra {extra!r}")
        for spec in optional[extra]:
            own = re.fullmatch(rf"{project['name']}\[([^\]]+)\]", spec.strip())
            if own:
                todo += [e.strip() for e in own.group(1).split(",")]
            else:
                specs.append(spec)
    pins = {}
    for spec in specs:
        requirement, _, marker = spec.partition(";")
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][A-Za-z0-9.]*)\s*(,.*)?", requirement)
        if m is None:
            sys.exit(f"pyproject.toml: {spec!r} has no lower bound (name>=X): every dependency needs one")
        pin = f"{m.group(1)}=={m.group(2)}" + (f" ;{marker}" if marker else "")
        name, version = m.group(1).lower(), _numbers(m.group(2))
        if name not in pins or version > pins[name][0]:  # two extras' bounds: the higher one satisfies both
            pins[name] = (version, pin)
    return sorted(pin for _, pin in pins.values())


def _numbers(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version))


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    print("\n".join(lowest_pins(root / "pyproject.toml", sys.argv[1:])))
