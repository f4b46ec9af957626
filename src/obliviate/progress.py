"""Progress bars shared by training, unlearning and evaluation (silent when disabled): rich's live bar on a terminal;
plain lines when the output is a log or a pipe (`make demo > log`, CI), where a live bar shows nothing for minutes."""
from __future__ import annotations

import contextlib
import sys
import time

_enabled = True
_plain_only = False


def set_enabled(flag: bool) -> None:
    global _enabled
    _enabled = flag


def enabled() -> bool:
    return _enabled


def force_plain(flag: bool) -> None:
    """Plain lines even on a terminal (worker processes that share it)."""
    global _plain_only
    _plain_only = flag


def _info(fields: dict) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())


def _is_terminal() -> bool:
    isatty = getattr(sys.stdout, "isatty", None)  # rich draws on stdout
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


@contextlib.contextmanager
def bar(description: str, total: int):
    """Yield an `advance(n=1, **fields)` function."""
    if not _enabled:
        yield lambda n=1, **kw: None
        return
    if _plain_only or not _is_terminal():
        with _plain(description, total) as advance:
            yield advance
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[info]}"), transient=False) as p:
        task = p.add_task(description, total=total, info="")

        def advance(n: int = 1, **fields):
            p.update(task, advance=n, info=_info(fields))

        yield advance


@contextlib.contextmanager
def _plain(description: str, total: int):
    """One flushed line when the bar starts, one each time another tenth of the total is done, the last one, and
    where the work ended if it stopped early: `unlearn NPO: 60/120 (50%) 12s loss=-3.2`."""
    t0 = time.time()
    state = {"done": 0, "shown": 0, "info": ""}
    every = max(1, -(-total // 10))  # ceil(total / 10)

    def line() -> None:
        done = state["done"]
        pct = f" ({done / total:.0%})" if total > 0 else ""
        text = f"{description}: {done}/{total}{pct} {time.time() - t0:.0f}s"
        print(text + (f" {state['info']}" if state["info"] else ""), flush=True)
        state["shown"] = done

    def advance(n: int = 1, **fields):
        state["done"] += n
        if fields:
            state["info"] = _info(fields)
        done = state["done"]
        if done // every > state["shown"] // every or (done >= total > state["shown"]):
            line()

    print(f"{description}: 0/{total}", flush=True)
    yield advance
    if state["done"] != state["shown"]:  # stopped early (a non-finite loss): say where
        line()
