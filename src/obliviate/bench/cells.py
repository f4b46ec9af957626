"""A bench cell: one ordinary run folder, keyed by the hash of its resolved run config and its kind. Its record
OUT/cells/<key>.json (written atomically) is the source of truth for its status; OUT/cells/<key>.lock (O_EXCL,
holding pid, host and start time) keeps two bench processes from running it at once. `run_one` runs one cell in any
process (it is what `obliviate.bench.execute` hands to workers); nothing here imports torch until a cell runs."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from obliviate.errors import ObliviateError

KINDS = ("validation", "reported", "reference", "scalability", "sustainability")
OUT_MARK = "$OUT"  # the bench folder's path in a key's text: a moved bench folder keeps its keys


def set_dotted(data: dict, key: str, value) -> dict:
    """data with `key` ("train.lr") set to a copy of `value`, creating sections as needed."""
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ObliviateError(f"{key}: {p!r} is not a section")
    node[parts[-1]] = copy.deepcopy(value)
    return data


def merge(base: dict, overrides: dict) -> dict:
    """A deep copy of `base` with `overrides` applied: nested sections merge, dotted keys set one value."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if "." in key:
            set_dotted(out, key, value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve(data: dict, source: str):
    """The RunConfig of a cell's config data (validated as `obliviate run` validates a config file)."""
    from obliviate.config import build_config

    return build_config(data, source)


def cell_key(config: dict, kind: str, out: str | Path) -> str:
    """16 hex of sha256 over the resolved run config (json, sort_keys; without where the run folder goes, which is
    the key itself) and the kind. Paths inside the bench folder count relative to it."""
    keyed = {k: v for k, v in config.items() if k not in ("output_dir", "name")}
    text = json.dumps(keyed, sort_keys=True, default=str).replace(str(Path(out).absolute()), OUT_MARK)
    return hashlib.sha256((text + kind).encode()).hexdigest()[:16]


@dataclass
class Cell:
    kind: str
    method: str  # the row: the method's label
    params: dict
    target: str
    seed: int | None
    config: dict  # resolved run config, with output_dir = OUT/cells and name = key
    key: str
    request: int | None = None
    size: float | None = None
    export: dict | None = None  # sustainability: {"run": the previous request's run folder, "to": its export folder}
    after: list = field(default_factory=list)  # keys of cells that must be done first

    def record(self, **status) -> dict:
        return {"key": self.key, "kind": self.kind, "method": self.method, "params": self.params,
                "target": self.target, "seed": self.seed, "request": self.request, "size": self.size,
                "status": None, "reason": None, "seconds": None, "host": socket.gethostname(), "run": self.key,
                "config": self.config, **status}

    def task(self, out: Path) -> dict:
        """What a worker needs: small and picklable."""
        return {"key": self.key, "out": str(out), "record": self.record(), "export": self.export}


def content_hash(data, salt: str = "") -> str:
    return hashlib.sha256((json.dumps(data, sort_keys=True, default=str) + salt).encode()).hexdigest()


def make_cell(kind: str, method: str, params: dict, target: str, seed, config: dict, out: Path, **extra) -> Cell:
    """A cell of the resolved run config `config` (RunConfig.dump()); its run folder goes to OUT/cells/<key>."""
    key = cell_key(config, kind, out)
    config["output_dir"], config["name"] = str(Path(out).absolute() / "cells"), key
    return Cell(kind, method, params, target, seed, config, key, **extra)


# ---- records and locks ---------------------------------------------------------------------------------------------

def record_path(out: Path, key: str) -> Path:
    return Path(out) / "cells" / f"{key}.json"


def read_record(out: Path, key: str) -> dict | None:
    path = record_path(out, key)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # unreadable: treat as not done (it is rewritten atomically when the cell re-runs)
        return None
    return record if isinstance(record, dict) and record.get("status") in ("done", "failed") else None


def write_record(out: Path, record: dict) -> None:
    from obliviate.runs import atomic_write

    atomic_write(record_path(out, record["key"]), json.dumps(record, indent=1, sort_keys=True, default=str))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _read_lock(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written, or garbage: not stale by pid


def lock_is_stale(holder: dict | None) -> bool:
    """A lock of a process on this host that is gone. A lock of another host is never taken over here (its process
    cannot be seen from this one): delete OUT/cells/<key>.lock by hand if that host is gone."""
    return bool(holder) and holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) and \
        not _pid_alive(holder["pid"])


def try_lock(out: Path, key: str, token: str | None = None) -> bool:
    """Take the cell's lock file (O_EXCL); a stale lock (its process on this host is gone) is taken over, under a
    second O_EXCL file so that two processes never both take it over. `token`: the bench process's mark on the task,
    so that it can remove the lock of a worker that died on another host."""
    path = Path(out) / "cells" / f"{key}.lock"
    mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "token": token})
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            if holder is None:
                continue  # released in between: try again
            if not lock_is_stale(holder):
                return False
            if not _take_over(path, holder):
                return False
            continue
        with os.fdopen(fd, "w") as f:
            f.write(mine)
        return True
    return False


def _take_over(path: Path, holder: dict) -> bool:
    guard = path.with_name(path.name + ".takeover")
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        if lock_is_stale(_read_lock(guard)):  # a process died while taking over
            guard.unlink(missing_ok=True)
        return False
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        if _read_lock(path) == holder:  # still the dead process's lock, not a new live one
            path.unlink(missing_ok=True)
        return True
    finally:
        guard.unlink(missing_ok=True)


def unlock(out: Path, key: str) -> None:
    path = Path(out) / "cells" / f"{key}.lock"
    holder = _read_lock(path)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


def remove_lock_of(out: Path, key: str, token: str) -> None:
    """Remove the cell's lock if the task marked `token` took it (its worker died without releasing it)."""
    path = Path(out) / "cells" / f"{key}.lock"
    holder = _read_lock(path)
    if holder and holder.get("token") == token:
        path.unlink(missing_ok=True)


def lock_holder(out: Path, key: str) -> dict | None:
    return _read_lock(Path(out) / "cells" / f"{key}.lock")


def clear_run_folder(out: Path, key: str) -> None:
    """Remove what a killed or failed earlier attempt left of the cell's run folder (the claim writes into a
    temporary folder and renames it, so a folder without a record is one whose record was never written)."""
    folder = Path(out) / "cells" / key
    if folder.is_dir() and not folder.is_symlink():
        shutil.rmtree(folder)
    (Path(out) / "cells" / f"{key}.log").unlink(missing_ok=True)


# ---- running one cell (in any process) -----------------------------------------------------------------------------

def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, ObliviateError):
        return text or type(e).__name__
    if isinstance(e, MemoryError) or "out of memory" in text.lower():
        return f"out of memory ({type(e).__name__}{': ' + text if text else ''})"[:300]
    return f"{type(e).__name__}: {text}"[:300] if text else type(e).__name__


def settled(record: dict | None, retry_failed: bool) -> bool:
    """A cell that needs no run: done, or failed and not retried."""
    return record is not None and (record["status"] == "done" or not retry_failed)


def run_one(task: dict) -> dict:
    """Run one cell under its lock: export the previous sustainability request if asked, run the config, and return
    (and write) the cell's record, done or failed with a one-line reason. Never raises for the cell's own failure.
    A cell that another process holds returns {"key", "status": "busy"}; one finished meanwhile, its record."""
    out, key, record = Path(task["out"]), task["key"], dict(task["record"])
    if not try_lock(out, key, task.get("token")):
        return {"key": key, "status": "busy"}
    try:
        existing = read_record(out, key)
        if settled(existing, task.get("retry", False)):  # finished by another process since the bench looked
            return existing
        clear_run_folder(out, key)  # what a killed or failed earlier attempt left
        log_path = out / "cells" / f"{key}.log"
        start = time.time()

        def log(*parts):
            with open(log_path, "a") as f:
                f.write(" ".join(str(p) for p in parts) + "\n")
        try:
            if task.get("export"):
                _export(Path(task["export"]["run"]), Path(task["export"]["to"]))
            from obliviate import progress
            from obliviate.runners import run

            progress.set_enabled(False)
            run(resolve(record["config"], f"cell {key}"), log=log)
            record.update(status="done", reason=None)
        except Exception as e:  # ObliviateError, NonFiniteLoss, MemoryError, CUDA out of memory, anything: recorded
            log(f"failed: {e!r}")
            record.update(status="failed", reason=one_line(e))
        record.update(seconds=round(time.time() - start, 3), host=socket.gethostname())
        write_record(out, record)
        return record
    finally:
        unlock(out, key)


def _export(run_dir: Path, to: Path) -> None:
    """The previous request's unlearned model as a full model folder (the family's export), once; written beside
    and renamed, so a killed export leaves nothing that looks finished."""
    if (to / "README.md").is_file():  # the model card is written last
        return
    from obliviate.run_actions import export_run

    tmp = to.with_name(f".{to.name}.tmp-{os.getpid()}")  # tmp/<name>: the model card names the folder `to.name`
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(to, ignore_errors=True)
    tmp.mkdir()
    try:
        export_run(run_dir, tmp / to.name)
        os.replace(tmp / to.name, to)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
