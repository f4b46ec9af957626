"""Where bench cells run: one after the other in this process, in local worker processes (`--workers N`), or as Ray
tasks (`--ray`, `--ray-address`). Cells are independent, so every backend only has to run `run_one(task)` for each
task and hand the results back as they finish. Nothing here imports torch or ray until a backend needs it.

Every backend sets torch's thread count (and OMP/MKL's) to the same `threads` before a cell runs: a cell's float
results depend on the thread count (reductions split differently), not on the backend, so the same cell gives the
same numbers serially, in a worker or on Ray (tests/test_execute.py checks it bit for bit).

A cell that raises, or whose process dies (killed, out of memory, os._exit), gives a failed result
`{"status": "failed", "reason": one line naming the cell, "task": task, "key": task["key"] if any, "seconds"}`
and the other cells go on."""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator

from obliviate.errors import ObliviateError

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def execute(tasks: list, run_one: Callable, workers: int = 1, ray_address: str | None = None, use_ray: bool = False,
            threads: int | None = None) -> Iterator:
    """Yield run_one(task) for every task, in the order they finish. `run_one` must be a module-level (picklable)
    function and each task a small picklable object. workers 1 without Ray: serially, in this process; workers N:
    N spawned processes, each running one cell at a time; use_ray: a local Ray instance of workers x threads CPUs,
    started and shut down here; ray_address ("auto", host:port): an existing cluster, left running. `threads`:
    torch's thread count for every cell (default: this machine's cores // workers, at least 1)."""
    tasks = list(tasks)
    if workers < 1:
        raise ObliviateError(f"--workers must be at least 1, not {workers}")
    if threads is not None and threads < 1:
        raise ObliviateError(f"--threads must be at least 1, not {threads}")
    threads = threads or max(1, cpu_count() // workers)
    if not tasks:
        return iter(())
    if use_ray or ray_address:
        return _on_ray(tasks, run_one, workers, threads, ray_address)
    from obliviate.workers import can_start_processes

    if workers == 1 or not can_start_processes():  # a pool's worker may not start processes: the same cells here
        return _serially(tasks, run_one, threads)
    return _in_workers(tasks, run_one, workers, threads)


def cpu_count() -> int:
    """The cores this process may use (a cpuset or taskset limit counts, as in a Slurm allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def describe(task) -> str:
    """How a failed result names its cell: the bench's cell key, else the task itself (shortened)."""
    key = task.get("key") if isinstance(task, dict) else None
    if key is not None:
        return f"cell {key}"
    text = repr(task)
    return f"task {text[:60] + '...' if len(text) > 60 else text}"


def failed(task, reason: str, seconds: float | None = None) -> dict:
    result = {"status": "failed", "reason": f"{describe(task)}: {reason}"[:300], "task": task, "seconds": seconds}
    if isinstance(task, dict) and "key" in task:
        result["key"] = task["key"]
    return result


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def set_threads(threads: int) -> int:
    """Torch's (and the BLAS libraries') thread count; returns torch's previous one. The environment variables come
    first so that a process that has not imported torch yet starts its thread pools at that size."""
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    return before


def call(run_one: Callable, task, threads: int):
    """What a worker (a local process or a Ray task) runs: ("done", result) or ("failed", one line). The exception
    becomes a line here because its object may not unpickle in the parent (a class only the worker can import)."""
    set_threads(threads)
    try:
        return "done", run_one(task)
    except Exception as e:
        return "failed", one_line(e)


# ---- serially, in this process -------------------------------------------------------------------------------------

def _serially(tasks: list, run_one: Callable, threads: int) -> Iterator:
    saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    before = set_threads(threads)
    try:
        for task in tasks:
            start = time.time()
            try:
                yield run_one(task)
            except Exception as e:  # as in a worker: recorded, the others go on
                yield failed(task, one_line(e), round(time.time() - start, 3))
    finally:
        import torch

        torch.set_num_threads(before)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# ---- local worker processes ----------------------------------------------------------------------------------------

def _in_workers(tasks: list, run_one: Callable, workers: int, threads: int) -> Iterator:
    """One single-process pool per worker slot: a process that dies breaks only its own pool, so the failure names
    exactly the cell it was running (a shared pool fails every cell in flight), and the slot gets a fresh process.
    Spawned, never forked: a fork of a process that has imported torch can deadlock in its thread pools."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    context = multiprocessing.get_context("spawn")

    def new_slot():
        return ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=set_threads, initargs=(threads,))

    slots = [new_slot() for _ in range(min(workers, len(tasks)))]
    todo = list(reversed(tasks))  # popped from the end: the given order
    running = {}  # future -> (slot index, task, start, process)

    def submit(i):
        task = todo.pop()
        future = slots[i].submit(call, run_one, task, threads)
        running[future] = (i, task, time.time(), _process_of(slots[i]))

    try:
        for i in range(len(slots)):
            submit(i)
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                i, task, start, process = running.pop(future)
                seconds = round(time.time() - start, 3)
                try:
                    status, value = future.result()
                    yield value if status == "done" else failed(task, value, seconds)
                except BrokenProcessPool:
                    yield failed(task, _death(process), seconds)
                    slots[i].shutdown(wait=False)
                    slots[i] = new_slot()
                except Exception as e:  # e.g. the result would not pickle
                    yield failed(task, one_line(e), seconds)
                if todo:
                    submit(i)
    finally:  # also on Ctrl-C or when the caller stops early: no cell keeps running unseen
        for slot in slots:
            _stop(slot)


def _process_of(pool):
    """The pool's one process (a private attribute of concurrent.futures, read only to report how it ended)."""
    processes = getattr(pool, "_processes", None) or {}
    return next(iter(processes.values()), None)


def _death(process) -> str:
    if process is not None:
        process.join(timeout=5)  # the exit code is set once the process is reaped
    code = getattr(process, "exitcode", None)
    if code is None:
        return "its worker process died before returning a result"
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        hint = " (killed: out of memory, or by a user or the scheduler)" if -code == signal.SIGKILL else ""
        return f"its worker process was ended by {name}{hint} before returning a result"
    return f"its worker process exited with code {code} before returning a result"


def _stop(pool) -> None:
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        if process.is_alive():
            process.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


# ---- Ray -----------------------------------------------------------------------------------------------------------

def _on_ray(tasks: list, run_one: Callable, workers: int, threads: int, address: str | None) -> Iterator:
    """Each cell a Ray task that reserves `threads` CPUs, so Ray runs as many at once as the cluster holds. Tasks are
    not retried: a cell that crashed its worker or ran out of memory is recorded as failed, as locally, and not run
    a second time into the same folder."""
    from obliviate.families import require_extra

    require_extra("ray", "ray")
    import ray

    started = not ray.is_initialized()
    if started and address:
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ObliviateError(f"--ray-address {address}: cannot join a Ray cluster there ({_ray_line(e)})") from e
    elif started:
        ray.init(num_cpus=workers * threads, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
                 object_store_memory=100 * 2**20)  # the results are small records
    try:
        biggest = max((n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
        if threads > biggest:
            raise ObliviateError(f"--threads {threads}: no node of the Ray cluster has that many CPUs (the largest "
                                 f"has {biggest:g}); pass a smaller --threads")
        remote = ray.remote(call).options(num_cpus=threads, max_retries=0)
        pending = {remote.remote(run_one, task, threads): (task, time.time()) for task in tasks}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    task, start = pending.pop(ref)
                    try:
                        status, value = ray.get(ref)
                        yield value if status == "done" else failed(task, value, round(time.time() - start, 3))
                    except ray.exceptions.RayError as e:  # the worker crashed, ran out of memory, was cancelled
                        yield failed(task, _ray_line(e), round(time.time() - start, 3))
        finally:
            for ref in pending:  # stopped early (Ctrl-C, the caller closed the generator): no orphan cells
                ray.cancel(ref, force=True)
    finally:
        if started:  # stops a local instance; from a cluster, only disconnects
            ray.shutdown()


def _ray_line(e: BaseException) -> str:
    """Ray's errors carry whole tracebacks and log excerpts: the first line that says something."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")[:240]
