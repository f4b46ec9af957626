"""Work in worker processes at once (spawned, one each): the demo's parts, a world's models. Small models gain little
from a second thread, so two processes of one thread each take about as long as one."""
from __future__ import annotations


def side_by_side(calls: dict[str, tuple]) -> dict:
    """{name: (function, args)} -> {name: result}, each call in its own spawned process. An error in one stops all
    (the pool's workers are terminated, so Ctrl-C or SIGTERM does not wait for minutes of training) and is raised
    here. The functions must be importable module-level functions."""
    import multiprocessing

    pool = multiprocessing.get_context("spawn").Pool(len(calls))
    try:
        pending = {name: pool.apply_async(function, args) for name, (function, args) in calls.items()}
        return {name: job.get() for name, job in pending.items()}
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.close()
        pool.join()


def can_start_processes() -> bool:
    """False inside a daemon process (a pool's worker), which may not start processes of its own."""
    import multiprocessing

    return not multiprocessing.current_process().daemon
