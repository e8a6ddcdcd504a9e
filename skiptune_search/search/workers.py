"""Parallel workers on one machine: the same search command, run N times on one study.

Each worker is the user's own command line run again with its share of the trials in
``SKIPTUNE_WORKER_TRIALS``, pinned to one GPU when there are GPUs (``CUDA_VISIBLE_DEVICES``
is respected) and given its share of CPU threads otherwise. Workers on other machines are just
more ``skiptune-search search`` commands pointed at the same ``--storage``.
"""

from __future__ import annotations

import os
import subprocess
import sys

from ..core.errors import InputError
from ..core.limits import usable_cores

SHARE_ENV = "SKIPTUNE_WORKER_TRIALS"


def worker_share() -> int | None:
    """This process's share of trials when it was started as a worker, else None."""
    value = os.environ.get(SHARE_ENV)
    return int(value) if value is not None else None


def split(remaining: int, workers: int) -> list[int]:
    """``remaining`` trials as evenly as possible over ``workers`` (the first get the extra)."""
    return [remaining // workers + (1 if i < remaining % workers else 0) for i in range(workers)]


def visible_gpus() -> list[str]:
    """The GPU ids this process may use, as CUDA_VISIBLE_DEVICES names them."""
    import torch

    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        return [g.strip() for g in listed.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def spawn(shares: list[int], argv: list[str] | None = None) -> list[subprocess.Popen]:
    """Start one worker per share (shares[0] is the caller's own and is not started)."""
    # the same command through this interpreter: works for the console script and for python -m
    argv = argv if argv is not None else [sys.executable, "-m", "skiptune_search.cli", *sys.argv[1:]]
    gpus = visible_gpus()
    threads = max(1, (os.cpu_count() or 1) // len(shares))
    children = []
    for i, share in enumerate(shares[1:], start=1):
        if share == 0:
            continue
        env = dict(os.environ, **{SHARE_ENV: str(share)})
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        else:
            env["OMP_NUM_THREADS"] = str(threads)
        children.append(subprocess.Popen(argv, env=env))
    return children


def max_workers() -> tuple[int, str]:
    """How many workers this machine can run side by side, and of what: one per visible GPU
    when there are GPUs, else one per CPU core this process may use."""
    gpus = visible_gpus()
    if gpus:
        return len(gpus), "GPU(s)"
    return usable_cores(), "CPU core(s)"


def check_workers(workers: int) -> None:
    """More workers than GPUs or cores only share them (each worker holds its own model, about
    1 GB for the bundled one): a one-line error before anything loads."""
    most, what = max_workers()
    if workers > most:
        raise InputError(f"{workers} workers, but this machine has {most} {what} for them: use at most {most}, and "
                         f"run the same search on other machines with the same storage for more", option="workers")


def own_setup(workers: int) -> None:
    """Check the worker count against the machine (``check_workers``), then give the calling
    (first) worker its share of CPU threads. On GPUs it needs nothing: it uses cuda:0, the first
    visible GPU, and the workers it spawns get the others."""
    check_workers(workers)
    if not visible_gpus():
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
