"""Atomic folders and files: everything is written under a temporary name and renamed into place at the end, so an
interrupted or failed run leaves nothing half-written."""
from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(final: str | Path):
    """Yield a temporary folder beside `final`; on success it becomes `final`, on error it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def write_json(path: str | Path, data) -> None:
    """Strict JSON (NaN and infinities become null), written to a temporary file beside `path` and renamed into
    place; on an error the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    text = json.dumps(_finite(data), indent=2, default=_jsonable, allow_nan=False) + "\n"
    # a unique name, so two writers never share one; os.open rather than mkstemp so the umask sets the mode (not 0600)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def cached_json(path: str | Path, compute):
    """The JSON at `path`, or `compute()` written there first (atomically): caches of results that depend only on
    what their file name says."""
    path = Path(path)
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, value)
    return value


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
    """Library versions for the run record."""
    import importlib.metadata as md
    import platform

    versions = {}
    for pkg in ("obliviate", "torch", "transformers", "peft", "accelerate", "safetensors", "scipy", "scikit-learn"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return {"python": platform.python_version(), "platform": platform.platform(), "versions": versions}


def resolve_device(name: str) -> str:
    """"auto" -> cuda when available, else cpu; a named CUDA device that is not there is an error."""
    import torch

    from obliviate.errors import ObliviateError

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ObliviateError(f"device '{name}' requested but CUDA is not available")
    return name
