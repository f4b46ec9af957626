"""Atomic folders and files: everything is written under a temporary name and renamed into place at the end, so an
interrupted or failed run leaves nothing half-written.

- `claim_run_dir(final)`: claim a run folder BEFORE the work (refuses an existing or concurrently claimed name and an
  unwritable disk at once), work in its temporary folder, move it into place at the end; errors, Ctrl-C and SIGTERM
  remove only what the claim created.
- `atomic_dir(final)`: the same without the claim, replacing `final` if it exists (world builds, exports).
- `atomic_write(path, data)`: one file, written beside its name, fsynced, renamed over it.

Temporary folders are named `.NAME.tmp-<pid>-<random>` and held (flock) by their process while it works; those of a
process that is gone are removed by the next claim in the same parent folder."""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from obliviate.errors import ObliviateError

try:
    import fcntl
except ImportError:  # Windows: claims fall back to O_EXCL lock files holding the pid
    fcntl = None

_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>[0-9]+)-[0-9a-z_]+$")
_LOCK = re.compile(r"^\.(?P<name>.+)\.obliviate-claim$")
# an OSError with no file name and one of these numbers is a write fault (Python's write() names no file)
_WRITE_FAULTS = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


@dataclass(frozen=True)
class RunDir:
    """A claimed run folder: write everything into `tmp`; it becomes `final` when the `with` block ends cleanly."""
    final: Path
    tmp: Path


@contextlib.contextmanager
def claim_run_dir(final: str | Path, log: Callable[[str], object] | None = print,
                  min_free_bytes: int = 0) -> Iterator[RunDir]:
    """Claim the run folder `final` before the work starts; yield a `RunDir` whose `tmp` folder the work writes into.

    Fails at once (ObliviateError, one line) if `final` exists, if another live run holds the same name, or if the
    folder cannot be written (a probe file is written and fsynced in the temporary folder; `min_free_bytes` also
    demands that much free space). When the block ends cleanly `tmp` is fsynced and renamed to `final`; on any error,
    Ctrl-C or SIGTERM (which raises SystemExit(143) for the duration, main thread only) the temporary folder and the
    claim are removed, and nothing else. A block that swallows its own error still commits: raise to abort."""
    final = Path(final)
    _check_name(final)
    if os.path.lexists(final):
        raise _exists(final)
    with _interruptible() as hold, contextlib.ExitStack() as undo:
        _make_parent(final, undo)
        sweep_stale(final.parent, log)
        undo.callback(_Lock(final).release)
        if os.path.lexists(final):  # finished by another run between the first check and the claim
            raise _exists(final)
        temp = _Temp(final)
        undo.callback(temp.remove)
        undo.callback(hold)  # runs first on the way out: no signal interrupts the cleanup
        try:
            _check_writable(temp.path, final, min_free_bytes)
        except OSError as e:
            raise _cannot_write(final, e) from e
        try:
            yield RunDir(final, temp.path)
        except Exception as e:
            fault = _as_write_fault(e)
            if fault is not None and (fault is not e or _write_fault(fault, temp.path)):
                raise _cannot_write(final, fault) from e
            raise
        hold()  # SIGTERM / Ctrl-C from here on wait until the folder is in place
        temp.sync(final)
        if os.path.lexists(final):
            raise ObliviateError(f"run folder already exists: {final} (made by something else while this run "
                                 f"worked; nothing was written)")
        temp.move_to(final)  # the made folders now hold `final`, so the cleanup leaves them


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()


@contextlib.contextmanager
def atomic_dir(final: str | Path, log: Callable[[str], object] | None = print) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it becomes `final` (replacing an existing `final`), on
    error, Ctrl-C or SIGTERM it is removed. A failure while moving into place raises ObliviateError naming `final`
    and leaves the old `final` as it was."""
    final = Path(final)
    _check_name(final)
    with _interruptible() as hold, contextlib.ExitStack() as undo:
        _make_parent(final, undo)
        sweep_stale(final.parent, log)
        temp = _Temp(final)
        undo.callback(temp.remove)
        undo.callback(hold)
        try:
            yield temp.path
        except Exception as e:
            fault = _as_write_fault(e)
            if fault is not None and (fault is not e or _write_fault(fault, temp.path)):
                raise _cannot_write(final, fault) from e
            raise
        hold()
        temp.sync(final)
        if not os.path.lexists(final):
            temp.move_to(final)
            return
        old = final.parent / f".{final.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.replace(final, old)
        except OSError as e:
            raise _cannot_write(final, e) from e
        try:
            temp.move_to(final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.replace(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write `data` (str: UTF-8) to `path` atomically: a temporary file in the same folder, fsynced, renamed over
    `path`. On failure the old file is untouched, the temporary file is removed, and ObliviateError names `path`."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    tmp = None
    try:
        mode = _file_mode(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            if fcntl is not None:
                with contextlib.suppress(OSError):
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # alive: no sweep takes it
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(e, OSError):
            raise _cannot_write(path, e) from e
        raise
    _fsync_dir(path.parent)
    return path


def sweep_stale(parent: str | Path, log: Callable[[str], object] | None = print) -> list[str]:
    """Remove the `.NAME.tmp-<pid>-*` folders and files in `parent` left by processes that are gone (the pid is not
    alive here and nobody holds the folder's flock), and unheld `.NAME.obliviate-claim` files; report the temporary
    ones in one log line. Those of a live pid, or not provably abandoned, are left alone. Returns the names removed."""
    parent = Path(parent)
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    removed = []
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m and not entry.is_symlink() and _remove_if_abandoned(Path(entry.path), int(m["pid"])):
            removed.append(entry.name)
        elif _LOCK.match(entry.name) and entry.is_file(follow_symlinks=False):
            _remove_if_unheld_lock(Path(entry.path))
    if removed and log:
        log(f"removed {len(removed)} unfinished folder(s) or file(s) of killed runs in {parent}: {', '.join(removed)}")
    return removed


def write_json(path: str | Path, data) -> None:
    """Strict JSON (NaN and infinities become null), written atomically (`atomic_write`): on an error `path` is
    left as it was and no temporary file remains."""
    atomic_write(path, json.dumps(_finite(data), indent=2, default=_jsonable, allow_nan=False) + "\n")


def cached_json(path: str | Path, compute):
    """The JSON at `path`, or `compute()` written there first (atomically): caches of results that depend only on
    what their file name says. The value is always the one read back, so a first run and a cached one see the same
    (non-finite floats become None on the way)."""
    path = Path(path)
    if not path.is_file():
        value = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, value)
    return json.loads(path.read_text())


def _finite(o):
    """A copy with non-finite floats as None; numpy/torch scalars become Python numbers first, so their NaNs
    become null too instead of failing allow_nan."""
    if isinstance(o, float):
        return float(o) if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple, set)):
        return [_finite(v) for v in o]
    if o is None or isinstance(o, (str, int)):
        return o
    if hasattr(o, "item"):
        try:
            return _finite(o.item())
        except (ValueError, RuntimeError):  # not a one-element array/tensor: `default` refuses it below
            return o
    return o


def _jsonable(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def environment() -> dict:
    """Library versions for the run record, and what floating-point rounding depends on besides them: the CPU kernels
    torch dispatches to (`cpu_capability`: e.g. AVX2, AVX512) and the number of threads it uses."""
    import importlib.metadata as md
    import platform

    import torch

    versions = {}
    for pkg in ("obliviate", "torch", "transformers", "peft", "accelerate", "safetensors", "scipy", "scikit-learn"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return {"python": platform.python_version(), "platform": platform.platform(), "versions": versions,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}


def run_folder(config, started, subject: str | None = None) -> Path:
    """Where a run goes: OUTPUT_DIR/NAME, or a name from the start time, the method and what is forgotten (`subject`,
    by default the family's subject: the split or the concept)."""
    import re

    from obliviate.families import get

    subject = subject or str(getattr(config, get(config.family).subject))
    subject = re.sub(r"[^A-Za-z0-9_.-]+", "-", subject).strip("-.") or "run"
    return Path(config.output_dir) / (config.name or f"{started:%Y%m%d-%H%M%S}-{config.method}-{subject}")


def write_run_record(folder: Path, config, started, base: dict, device: str, history: list, metrics: dict) -> None:
    """The files every run folder holds, whatever its family: config, environment (with the base's record),
    history and metrics. The config's paths are recorded absolute, so the run can be attacked, exported and
    reported from any working directory."""
    from obliviate.config import resolve_paths

    write_json(folder / "config.json", resolve_paths(config.dump(), Path.cwd()))
    write_json(folder / "environment.json", {**environment(), "started": started.isoformat(), **base,
                                             "device": device})
    write_json(folder / "history.json", history)
    write_json(folder / "metrics.json", metrics)


def resolve_device(name: str) -> str:
    """"auto" -> cuda when available, else cpu; a named CUDA device that is not there is an error."""
    import torch

    from obliviate.errors import ObliviateError

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ObliviateError(f"device '{name}' requested but CUDA is not available")
    return name


# ---- internals -----------------------------------------------------------------------------------------------------

def _check_name(final: Path) -> None:
    if final.name in ("", ".", ".."):
        raise ObliviateError(f"not a folder name: {final}")


def _exists(final: Path) -> ObliviateError:
    return ObliviateError(f"run folder already exists: {final} (choose another name)")


def _cannot_write(path: Path, e: OSError) -> ObliviateError:
    return ObliviateError(f"cannot write to {path}: {e.strerror or e}")


def _make_parent(final: Path, undo: contextlib.ExitStack) -> None:
    """Make the folders above `final`; those made here are removed again (if still empty) when the work fails."""
    made = [d for d in (final.parent, *final.parent.parents) if not d.exists()]
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _cannot_write(final, e) from e
    for d in made:
        undo.callback(_remove_if_empty, d)


def _as_write_fault(e: BaseException) -> OSError | None:
    """The OSError behind an error of the work: itself, or a safetensors write (`save_file`, `save_pretrained`),
    whose SafetensorError is no OSError ("Error while serializing: IoError(Os { code: 28, ... })")."""
    if isinstance(e, OSError):
        return e
    if type(e).__name__ == "SafetensorError" and str(e).startswith("Error while serializing"):
        code = re.search(r"code: ([0-9]+)", str(e))
        number = int(code[1]) if code else errno.EIO
        return OSError(number, os.strerror(number) if code else str(e).splitlines()[0])
    return None


def _write_fault(e: OSError, tmp: Path) -> bool:
    """Whether an OSError from the work is a failure to write its output (then it gets the one-line message)."""
    names = [n for n in (e.filename, e.filename2) if n is not None]
    if not names:
        return e.errno in _WRITE_FAULTS
    root = os.path.abspath(tmp)
    return any(os.path.abspath(os.fsdecode(n)).startswith(root + os.sep) or os.path.abspath(os.fsdecode(n)) == root
               for n in names if isinstance(n, (str, bytes, os.PathLike)))


def _probe_write(folder: Path) -> None:
    """Write and fsync a small file in `folder`, then remove it (a read-only or full disk fails here)."""
    path = folder / ".write-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        size = 65536
        if os.write(fd, b"\0" * size) < size:  # a nearly full disk takes part of a write without an error
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        os.fsync(fd)
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)


def _check_writable(folder: Path, final: Path, min_free_bytes: int) -> None:
    _probe_write(folder)
    if min_free_bytes > 0 and hasattr(os, "statvfs"):
        st = os.statvfs(folder)
        free = st.f_bavail * st.f_frsize
        if free < min_free_bytes:
            raise ObliviateError(f"cannot write to {final}: {free / 2**30:.1f} GiB free, the run needs about "
                                 f"{min_free_bytes / 2**30:.1f} GiB")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid we could have written: leave it alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:  # Windows: os.kill(pid, 0) is not a probe
        return True
    return True


def _remove_if_abandoned(path: Path, pid: int) -> bool:
    """Remove a temporary folder or file whose process is gone: its pid is not alive here, and (where flock works)
    nobody holds it, so a process on another machine sharing the folder keeps its own."""
    if pid == os.getpid() or _pid_alive(pid):
        return False
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(path, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held (alive elsewhere), or cannot tell: keep it
            if fd is not None:
                os.close(fd)
            return False
    try:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    finally:
        if fd is not None:
            os.close(fd)
    return not os.path.lexists(path)


def _remove_if_unheld_lock(path: Path) -> None:
    if fcntl is None:
        return
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if _same_file(fd, path) and re.fullmatch(rb"[0-9]*\n?", os.pread(fd, 32, 0)):  # ours: a pid or nothing
            path.unlink()
    except OSError:
        pass
    finally:
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class _Lock:
    """The claim on a run folder's name: `.NAME.obliviate-claim` beside it (holding the pid), flock'ed for the whole
    run, so a second run of the same name fails at once. A killed run's flock dies with it, so its file is taken over
    or swept. Without flock (Windows, some network file systems) its creator (O_EXCL) holds the claim."""

    def __init__(self, final: Path):
        self.path = final.parent / f".{final.name}.obliviate-claim"
        self.fd = None
        if fcntl is None:
            self._exclusive(final)
            return
        for _ in range(50):
            try:
                fd, created = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                try:
                    fd, created = os.open(self.path, os.O_RDWR), False
                except FileNotFoundError:  # its holder just released it
                    continue
                except OSError as e:
                    raise _cannot_write(final, e) from e
            except OSError as e:
                raise _cannot_write(final, e) from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_pid(fd)
                os.close(fd)
                raise self._busy(final, owner) from None
            except OSError:  # no flock on this file system: the file's creator holds the claim
                os.close(fd)
                if not created:
                    self._exclusive(final)
                    return
                with contextlib.suppress(OSError):
                    self.path.write_text(f"{os.getpid()}\n")
                self.fd = -1
                return
            if _same_file(fd, self.path):  # not a file its last holder unlinked while we waited
                self.fd = fd
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                return
            os.close(fd)
        raise ObliviateError(f"cannot claim {final}: its lock file {self.path} keeps changing")

    def _exclusive(self, final: Path) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = _read_pid_file(self.path)
                if owner is None or _pid_alive(owner):
                    raise self._busy(final, owner) from None
                with contextlib.suppress(OSError):
                    self.path.unlink()  # a killed run's
                continue
            except OSError as e:
                raise _cannot_write(final, e) from e
            with contextlib.suppress(OSError):
                os.write(fd, f"{os.getpid()}\n".encode())
            os.close(fd)
            self.fd = -1
            return
        raise self._busy(final, _read_pid_file(self.path))

    @staticmethod
    def _busy(final: Path, owner: int | None) -> ObliviateError:
        who = f" (pid {owner})" if owner else ""
        return ObliviateError(f"run folder {final} is being written by another run{who}; choose another name")

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still holding it: a waiting claimer then sees the file changed
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0) if hasattr(os, "pread") else b""
        return int(text.decode().strip())
    except (OSError, ValueError):
        return None


def _read_pid_file(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


class _Temp:
    """A fresh `.NAME.tmp-<pid>-<random>` folder beside `final`, flock'ed while this process works in it."""

    def __init__(self, final: Path):
        self.fd, self.done = None, False
        for _ in range(100):
            path = final.parent / f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
            try:
                os.mkdir(path)
                break
            except FileExistsError:
                continue
            except OSError as e:
                raise _cannot_write(final, e) from e
        self.path = path
        if fcntl is not None:
            try:
                self.fd = os.open(path, os.O_RDONLY)
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pass

    def sync(self, final: Path) -> None:
        """fsync everything in the folder (a full disk that the writes did not report shows up here)."""
        try:
            _fsync_tree(self.path)
        except OSError as e:
            raise _cannot_write(final, e) from e

    def move_to(self, final: Path) -> None:
        """Rename the folder to `final`; ObliviateError naming `final` on failure."""
        try:
            os.replace(self.path, final)
        except OSError as e:
            raise _cannot_write(final, e) from e
        self.done = True
        _fsync_dir(final.parent)

    def remove(self) -> None:
        if not self.done:
            shutil.rmtree(self.path, ignore_errors=True)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX; best effort)."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _file_mode(path: Path) -> int:
    """The mode a file written in place would get: the existing file's, else 0o666 less the umask."""
    import stat

    with contextlib.suppress(OSError):
        return stat.S_IMODE(os.stat(path).st_mode)
    mask = None
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    mask = int(line.split()[1], 8)
    if mask is None:
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def _interruptible():
    """For the duration (main thread only), SIGTERM raises SystemExit(143) so that cleanup runs. Yields `hold()`:
    from then on SIGTERM and Ctrl-C wait until the block is left (a folder being moved into place or removed is not
    cut short); the signal is then re-delivered to the handler that was there before."""
    state = {"hold": False, "pending": None}
    main = threading.current_thread() is threading.main_thread()
    previous: dict = {}

    def on_signal(signum, frame):
        if state["hold"]:
            state["pending"] = state["pending"] or signum
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def hold():
        if state["hold"]:
            return
        state["hold"] = True
        if main and hasattr(signal, "SIGINT"):
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, on_signal)

    if main and hasattr(signal, "SIGTERM"):
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, on_signal)
    try:
        yield hold
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        if state["pending"] is not None:
            signal.raise_signal(state["pending"])


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def base_record(folder: str | Path) -> dict:
    """What a run records of its base model: the absolute path, and a SHA-256 of each weight file in it (sub-folders
    too, for pipelines), so `export` can refuse a base that changed since the run."""
    import hashlib

    folder = Path(folder).resolve()
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        files[path.relative_to(folder).as_posix()] = h.hexdigest()
    return {"base_model": str(folder), "base_weights_sha256": files}


def content_key(value) -> str:
    """SHA-256 of a JSON-able value (dataclasses, such as data items, by their fields): a cache key of what it holds."""
    import dataclasses
    import hashlib

    def plain(o):
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            return dataclasses.asdict(o)
        return str(o)
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=plain).encode()).hexdigest()


def evaluation_cache(family: str, base: dict, settings, cache_dir: str | None = None) -> Path:
    """Where the evaluation of a model folder (a user's original model) is cached, so the next run on the same folder
    reads it: under the cache root, named by the folder's content (its weight files' SHA-256 from `base`, a
    base_record, which the run computes anyway; every other file's bytes: config, tokenizer, generation config,
    chat template) and by `settings` (what else the numbers depend on: evaluation settings, prompt format, the data)."""
    import hashlib

    from obliviate import __version__
    from obliviate.worlds import cache_root
    from obliviate.evals import PROTOCOL

    folder = Path(base["base_model"])
    other = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix not in WEIGHT_SUFFIXES):
        rel = path.relative_to(folder)
        if not any(part.startswith(".") for part in rel.parts):  # .git, .cache: not the model
            h = hashlib.sha256()
            with open(path, "rb") as f:  # in chunks: a folder may hold other big files (.gguf, .onnx, .h5)
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            other[rel.as_posix()] = h.hexdigest()
    content = content_key([base["base_weights_sha256"], other])[:12]
    key = content_key([settings, __version__, PROTOCOL])[:12]
    return cache_root(cache_dir) / "evaluations" / f"{family}-{folder.name}-{content}" / f"eval-{key}.json"


def check_base(recorded: dict, base: str | Path) -> None:
    """Refuse a base whose weight files differ from those the run started from, naming the first that changed."""
    expected = recorded.get("base_weights_sha256")
    if expected is None:  # a run recorded before hashes were kept: nothing to compare
        return
    now = base_record(base)["base_weights_sha256"]
    for name in sorted(set(expected) | set(now)):
        if name not in now:
            raise ObliviateError(f"base model {base} is not the run's base: {name} is missing")
        if name not in expected:
            raise ObliviateError(f"base model {base} is not the run's base: {name} was not there")
        if expected[name] != now[name]:
            raise ObliviateError(f"base model {base} is not the run's base: {name} changed since the run "
                                 f"(sha256 {now[name][:12]}, recorded {expected[name][:12]})")


def apply_changed(module, changed_path: Path, prefix: str = "") -> None:
    """Load a run's changed.safetensors onto `module` (its state-dict names after `prefix`), refusing a file that is
    not safetensors and a base whose tensors are missing or of another shape, in one line naming the tensor."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        changed = load_file(str(changed_path))
    except (SafetensorError, OSError) as e:
        raise ObliviateError(f"{changed_path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    state = module.state_dict()
    for name, tensor in changed.items():
        key = name[len(prefix):] if name.startswith(prefix) else None
        if key not in state:
            raise ObliviateError(f"{changed_path} has tensors the base model lacks, e.g. {name}: wrong --base?")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise ObliviateError(f"{changed_path}: {name} has shape {tuple(tensor.shape)} but the base's is "
                                 f"{tuple(state[key].shape)}: wrong --base?")
    module.load_state_dict({k[len(prefix):]: v for k, v in changed.items()}, strict=False)


def read_run_config(run_dir: Path):
    """The config a run folder records (config.json), or a one-line error."""
    from obliviate.config import build_config
    from obliviate.data import read_json_file

    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ObliviateError(f"{run_dir} is not a run folder (no config.json)")
    data = read_json_file(path, "run config")
    if not isinstance(data, dict):
        raise ObliviateError(f"{path}: a run config must be a JSON object")
    return build_config(data, str(path), recorded=True)
