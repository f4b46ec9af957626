"""Run folders are claimed before the work, written under a temporary name and moved into place at the end; every
fault ends in one line and leaves nothing half-written, and only what the claim made is ever removed."""
from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from obliviate import runs
from obliviate.errors import ObliviateError
from obliviate.runs import atomic_dir, atomic_write, claim_run_dir

SRC = str(Path(__file__).resolve().parents[1] / "src")


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message
    return message


def dead_pid() -> int:
    """The pid of a process that has exited (and was reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    try:
        os.kill(p.pid, 0)
    except ProcessLookupError:
        return p.pid
    pytest.skip("the pid of a finished process was reused at once")


# ---- claim, work, move into place ----------------------------------------------------------------------------------

def test_claim_then_success(tmp_path):
    final = tmp_path / "runs" / "r1"
    with claim_run_dir(final, log=None) as run:
        assert run.final == final and run.tmp.parent == final.parent
        assert run.tmp.name.startswith(f".r1.tmp-{os.getpid()}-")
        assert not final.exists()  # the name is claimed by a lock beside it, not by the folder
        assert ".r1.obliviate-claim" in listing(final.parent)
        (run.tmp / "metrics.json").write_text("{}")
        (run.tmp / "sub").mkdir()
        (run.tmp / "sub" / "x.bin").write_bytes(b"123")
    assert listing(final.parent) == ["r1"]  # no temp folder, no lock left
    assert (final / "metrics.json").read_text() == "{}" and (final / "sub" / "x.bin").read_bytes() == b"123"


def test_existing_folder_refused_before_work(tmp_path):
    final = tmp_path / "r1"
    final.mkdir()
    (final / "precious.txt").write_text("keep")
    worked = []
    with pytest.raises(ObliviateError) as e:
        with claim_run_dir(final, log=None):
            worked.append(True)
    assert one_line(e) == f"run folder already exists: {final} (choose another name)"
    assert not worked
    assert listing(tmp_path) == ["r1"] and (final / "precious.txt").read_text() == "keep"


def test_error_or_interrupt_in_the_work_removes_only_what_the_claim_made(tmp_path):
    (tmp_path / "other-run").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    for fault in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(fault)):
            with claim_run_dir(tmp_path / "r1", log=None) as run:
                (run.tmp / "half.bin").write_bytes(b"half")
                raise fault
        assert listing(tmp_path) == ["notes.txt", "other-run"]


def test_a_write_fault_in_the_work_is_one_line(tmp_path):
    final = tmp_path / "r1"
    with pytest.raises(ObliviateError) as e:
        with claim_run_dir(final, log=None):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what f.write() raises on a full disk
    assert one_line(e) == f"cannot write to {final}: {os.strerror(errno.ENOSPC)}"
    assert listing(tmp_path) == []
    with pytest.raises(FileNotFoundError):  # not a write fault of the run folder: left as it is
        with claim_run_dir(final, log=None):
            open(tmp_path / "missing-input.txt")
    assert listing(tmp_path) == []


def test_signal_handler_restored_and_not_installed_off_the_main_thread(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with claim_run_dir(tmp_path / "r1", log=None):
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
    errors = []

    def work():
        try:
            with claim_run_dir(tmp_path / "r2", log=None) as run:
                (run.tmp / "a").write_text("a")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert not errors and (tmp_path / "r2" / "a").is_file()


# ---- two runs of the same name -------------------------------------------------------------------------------------

def test_second_claim_of_the_same_name_fails_and_the_first_finishes(tmp_path):
    final = tmp_path / "r1"
    with claim_run_dir(final, log=None) as first:
        (first.tmp / "first.txt").write_text("first")
        with pytest.raises(ObliviateError) as e:
            with claim_run_dir(final, log=None):
                pytest.fail("the second claim must not get to work")
        assert one_line(e) == f"run folder {final} is being written by another run (pid {os.getpid()}); " \
                              f"choose another name"
        # the failed claim removed nothing of ours
        assert first.tmp.is_dir() and (tmp_path / ".r1.obliviate-claim").is_file()
    assert listing(tmp_path) == ["r1"] and (final / "first.txt").read_text() == "first"
    with pytest.raises(ObliviateError, match="already exists"):
        with claim_run_dir(final, log=None):
            pass


def test_second_claim_without_flock_fails_too(tmp_path, monkeypatch):
    """Where there is no flock (Windows), the claim is an O_EXCL lock file with the pid; a dead pid's is taken over."""
    monkeypatch.setattr(runs, "fcntl", None)
    final = tmp_path / "r1"
    with claim_run_dir(final, log=None) as first:
        (first.tmp / "first.txt").write_text("first")
        with pytest.raises(ObliviateError, match="is being written by another run"):
            with claim_run_dir(final, log=None):
                pass
    assert listing(tmp_path) == ["r1"]
    (tmp_path / ".r2.obliviate-claim").write_text(f"{dead_pid()}\n")
    with claim_run_dir(tmp_path / "r2", log=None) as run:
        (run.tmp / "a").write_text("a")
    assert listing(tmp_path) == ["r1", "r2"]


def test_second_claim_where_flock_fails_too(tmp_path, monkeypatch):
    """A file system without flock (some network ones): the lock file's creator holds the claim."""
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(runs, "fcntl", SimpleNamespace(LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB, flock=no_locks))
    final = tmp_path / "r1"
    with claim_run_dir(final, log=None) as first:
        (first.tmp / "first.txt").write_text("first")
        with pytest.raises(ObliviateError, match=f"is being written by another run \\(pid {os.getpid()}\\)"):
            with claim_run_dir(final, log=None):
                pass
    assert listing(tmp_path) == ["r1"] and (final / "first.txt").read_text() == "first"


CHILD = """
import sys, time
from obliviate.runs import claim_run_dir
with claim_run_dir(sys.argv[1], log=None) as run:
    (run.tmp / "partial.bin").write_bytes(b"x" * 1000)
    print("claimed", flush=True)
    time.sleep(120)
"""


def start_child(final: Path) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(final)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": SRC})
    assert child.stdout.readline().strip() == "claimed"
    return child


def test_sigterm_during_the_work_removes_the_temp_folder_and_the_claim(tmp_path):
    (tmp_path / "other-run").mkdir()
    final = tmp_path / "r1"
    child = start_child(final)
    try:
        assert any(n.startswith(f".r1.tmp-{child.pid}-") for n in listing(tmp_path))
        with pytest.raises(ObliviateError) as e:  # another process holds the name
            with claim_run_dir(final, log=None):
                pass
        assert f"being written by another run (pid {child.pid})" in one_line(e)
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == 143
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert listing(tmp_path) == ["other-run"]


def test_a_killed_run_frees_its_name_and_its_temp_folder_is_swept(tmp_path):
    final = tmp_path / "r1"
    child = start_child(final)
    child.kill()  # SIGKILL: no cleanup runs
    child.wait()
    temp = [n for n in listing(tmp_path) if n.startswith(".r1.tmp-")]
    assert len(temp) == 1
    lines = []
    with claim_run_dir(final, log=lines.append) as run:
        (run.tmp / "a").write_text("a")
    assert listing(tmp_path) == ["r1"]
    assert len(lines) == 1 and temp[0] in lines[0]


# ---- stale temporary folders ---------------------------------------------------------------------------------------

def test_stale_temp_folder_of_a_dead_pid_is_removed_and_a_live_one_kept(tmp_path):
    gone = dead_pid()
    stale = tmp_path / f".old.tmp-{gone}-ab12cd34"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "weights.bin").write_bytes(b"w")
    stale_file = tmp_path / f".report.html.tmp-{gone}-x1y2z3"
    stale_file.write_text("half")
    live = tmp_path / f".busy.tmp-{os.getpid()}-ab12cd34"
    live.mkdir()
    # a dead pid here, but its folder is held: a process on another machine (or pid namespace) sharing the folder
    elsewhere = tmp_path / f".remote.tmp-{gone}-ffff0000"
    elsewhere.mkdir()
    held = os.open(elsewhere, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    users = [tmp_path / ".mine.tmp-notapid", tmp_path / f"plain.tmp-{gone}-ab12cd34", tmp_path / "results"]
    for u in users:
        u.mkdir()
    (tmp_path / ".old-run.obliviate-claim").write_text(f"{gone}\n")  # an unheld lock file of a killed run
    foreign = [tmp_path / ".other-tool.lock", tmp_path / ".odd.obliviate-claim"]  # not ours: kept
    foreign[0].write_text("")
    foreign[1].write_text("someone else's words")
    lines = []
    try:
        with claim_run_dir(tmp_path / "new", log=lines.append) as run:
            (run.tmp / "a").write_text("a")
    finally:
        os.close(held)
    assert not stale.exists() and not stale_file.exists() and not (tmp_path / ".old-run.obliviate-claim").exists()
    assert live.is_dir() and elsewhere.is_dir() and all(u.is_dir() for u in users) and all(f.is_file() for f in foreign)
    assert len(lines) == 1 and stale.name in lines[0] and stale_file.name in lines[0] and str(tmp_path) in lines[0]
    assert (tmp_path / "new" / "a").is_file()


# ---- the output cannot be written ----------------------------------------------------------------------------------

def test_read_only_parent_fails_before_the_work(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        if os.access(parent, os.W_OK):  # root: chmod does not stop writes (the monkeypatched tests below run)
            pytest.skip("running as root: a read-only mode does not stop writes")
        with pytest.raises(ObliviateError) as e:
            with claim_run_dir(parent / "r1", log=None):
                pytest.fail("must fail before the work")
        assert one_line(e).startswith(f"cannot write to {parent / 'r1'}: ")
        assert listing(parent) == []
    finally:
        parent.chmod(0o755)


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC, errno.EACCES])
def test_unwritable_output_fails_before_the_work(tmp_path, monkeypatch, code):
    def refuse(folder):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(runs, "_probe_write", refuse)
    (tmp_path / "other-run").mkdir()
    final = tmp_path / "r1"
    with pytest.raises(ObliviateError) as e:
        with claim_run_dir(final, log=None):
            pytest.fail("must fail before the work")
    assert one_line(e) == f"cannot write to {final}: {os.strerror(code)}"
    assert listing(tmp_path) == ["other-run"]


def test_real_probe_write_failure(tmp_path, monkeypatch):
    """The probe itself (not monkeypatched away): its fsync fails as on a full disk."""
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(ObliviateError, match="No space left on device"):
        with claim_run_dir(tmp_path / "r1", log=None):
            pytest.fail("must fail before the work")
    assert listing(tmp_path) == []


def test_too_little_free_space_fails_before_the_work(tmp_path):
    with pytest.raises(ObliviateError) as e:
        with claim_run_dir(tmp_path / "r1", log=None, min_free_bytes=2 ** 62):
            pytest.fail("must fail before the work")
    assert one_line(e).startswith(f"cannot write to {tmp_path / 'r1'}: ") and "GiB free" in str(e.value)
    assert listing(tmp_path) == []


def test_a_failure_moving_into_place_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    def full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    final = tmp_path / "r1"
    with pytest.raises(ObliviateError) as e:
        with claim_run_dir(final, log=None) as run:
            (run.tmp / "metrics.json").write_text("{}")
            monkeypatch.setattr(os, "replace", full)
    assert one_line(e) == f"cannot write to {final}: {os.strerror(errno.ENOSPC)}"
    assert listing(tmp_path) == []


# ---- atomic_dir (world builds, exports) ----------------------------------------------------------------------------

def test_atomic_dir_replaces_and_cleans_up(tmp_path, monkeypatch):
    final = tmp_path / "world"
    with atomic_dir(final) as tmp:  # the old call, unchanged
        assert tmp.name.startswith(f".world.tmp-{os.getpid()}-")
        (tmp / "v").write_text("1")
    with atomic_dir(final, log=None) as tmp:
        (tmp / "v").write_text("2")
    assert listing(tmp_path) == ["world"] and (final / "v").read_text() == "2"
    with pytest.raises(RuntimeError):
        with atomic_dir(final, log=None) as tmp:
            (tmp / "v").write_text("3")
            raise RuntimeError("boom")
    assert listing(tmp_path) == ["world"] and (final / "v").read_text() == "2"

    real = os.replace

    def full_on_the_new_folder(src, dst):
        if ".tmp-" in Path(src).name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(src, dst)

    monkeypatch.setattr(os, "replace", full_on_the_new_folder)
    with pytest.raises(ObliviateError) as e:
        with atomic_dir(final, log=None) as tmp:
            (tmp / "v").write_text("4")
    assert one_line(e) == f"cannot write to {final}: {os.strerror(errno.ENOSPC)}"
    assert listing(tmp_path) == ["world"] and (final / "v").read_text() == "2"  # the old folder, as it was


# ---- atomic files --------------------------------------------------------------------------------------------------

def test_atomic_write_writes_and_replaces(tmp_path):
    path = tmp_path / "report.html"
    atomic_write(path, "héllo")
    assert path.read_bytes() == "héllo".encode()
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # the mode write_text would give, not mkstemp's 0o600
    path.chmod(0o640)
    atomic_write(path, b"\x00bytes")
    assert path.read_bytes() == b"\x00bytes" and path.stat().st_mode & 0o777 == 0o640
    assert listing(tmp_path) == ["report.html"]


@pytest.mark.parametrize("where", ["replace", "fsync", "write"])
def test_atomic_write_failure_leaves_the_old_file(tmp_path, monkeypatch, where):
    path = tmp_path / "report.html"
    path.write_text("the good report")

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "write":
        big = "x" * 10_000
        monkeypatch.setattr(os, "fsync", full)  # write() is buffered: the first failure shows at flush/fsync
    else:
        big = "new"
        monkeypatch.setattr(os, where, full)
    with pytest.raises(ObliviateError) as e:
        atomic_write(path, big)
    assert one_line(e) == f"cannot write to {path}: {os.strerror(errno.ENOSPC)}"
    monkeypatch.undo()
    assert path.read_text() == "the good report" and listing(tmp_path) == ["report.html"]


def test_atomic_write_interrupted_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    path.write_text("old")

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old" and listing(tmp_path) == ["a.json"]


def test_report_html_is_written_atomically(tmp_path, monkeypatch):
    from obliviate.bench.report import write_run_report

    metrics = {"method": "GA", "split": "forget10", "status": "completed"}
    write_run_report(tmp_path, metrics, [])
    good = (tmp_path / "report.html").read_text()
    assert "obliviate run: GA on forget10" in good

    def full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(ObliviateError, match=f"cannot write to {tmp_path / 'report.html'}"):
        write_run_report(tmp_path, {**metrics, "status": "stopped"}, [])
    monkeypatch.undo()
    assert (tmp_path / "report.html").read_text() == good and listing(tmp_path) == ["report.html"]


def test_signals_wait_while_a_folder_moves_into_place():
    """After hold(), SIGTERM is delivered only when the block is left, to the handler that was there before."""
    got = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        with runs._interruptible() as hold:
            hold()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert got == []
        assert got == [signal.SIGTERM]
        with pytest.raises(SystemExit) as e:  # before hold(): SIGTERM ends the work with exit status 143
            with runs._interruptible():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
        assert e.value.code == 143
    finally:
        signal.signal(signal.SIGTERM, previous)
