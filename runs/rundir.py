"""A run directory belongs to one run: a lock held for the run's life, and refusals that keep what is written.

The lock is an advisory `flock` on `<run>/lock`: the kernel drops it when the process dies, so a killed run never
leaves it stale. Claiming a directory also removes the temporary checkpoint files a kill mid-write left behind.
"""
import contextlib
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no lock (documented); the other checks still hold
    fcntl = None


@contextlib.contextmanager
def claimed(run_dir, config, resume):
    """Hold `run_dir` for one run. A fresh run is refused where a checkpoint exists or another run's config is
    saved; a resume is refused where there is no checkpoint yet (saying how to start afresh)."""
    from runs.config import load_yaml
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "lock", "a+") as lock:
        if fcntl is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                owner = lock.read().strip() or "?"
                raise FileExistsError(f"{run_dir} is in use by another run (pid {owner}); wait for it to finish or "
                                      "pass another --out") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        for orphan in run_dir.glob(".checkpoint.pt.tmp*"):  # a kill mid-write
            orphan.unlink(missing_ok=True)
        checkpoint, saved_config = run_dir / "checkpoint.pt", run_dir / "config.yaml"
        if resume and not checkpoint.exists():
            raise FileNotFoundError(f"{run_dir} has no checkpoint yet (stopped before its first one): start it afresh "
                                    f"with python -m runs.train --config {saved_config} --out {run_dir}")
        if not resume and checkpoint.exists():
            raise FileExistsError(f"{run_dir} already holds a run: pass --resume {run_dir} or another --out")
        if not resume and saved_config.exists() and load_yaml(saved_config) != config:
            raise FileExistsError(f"{run_dir} holds another run's config.yaml (no checkpoint yet): pass another --out "
                                  "or delete the directory")
        yield run_dir
