"""Parallel workers on one machine: N processes sharing one study.

The search command starts each worker through the library, never through the command line:
``python -P -c`` (nothing imported from the working folder) runs ``worker.main``, which reads its
job from an inherited pipe, its stdin, in two JSON lines. The first (``load``: the task, the model
source, the evaluator's settings) is written as the worker starts, before this process loads its
own model, so that the workers import and load theirs at the same time (not one after the other);
the second (``job``: the storage, the study, its share of the trials) once the study is open. So
the storage URL, password included, is on no command line (``ps`` shows every user the command
lines). Each worker is pinned to one GPU when there are GPUs (``CUDA_VISIBLE_DEVICES`` is
respected) and given its share of CPU threads otherwise.

The pipe stays open while the parent lives: when it closes (the parent ended, even by SIGKILL) the
worker stops as on SIGTERM, its trial under way marked failed; closed before the second line, the
worker ends with nothing done. A parent that is interrupted itself (or fails before the workers
have their share) stops its workers and waits for them (``stopped_with``). Workers on other
machines are just more ``skiptune-search search`` commands pointed at the same ``--storage``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
from typing import Iterator

from ..core.errors import InputError
from ..core.limits import usable_cores

WORKER_CODE = "from skiptune_search.search.worker import main; main()"
STOP_GRACE_S = 30.0  # seconds a stopped worker has to end its trial (failed) before it is killed


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


def load(task, source, evaluator: dict, threads: int = 0) -> dict:
    """A worker's first line, what it loads while the caller loads its own: ``task`` (a Task),
    ``source`` (the ModelSource, its kind named), ``evaluator`` (Evaluator's keyword arguments:
    batch_size, feature_weights, device) and its CPU threads (0: its share of the cores)."""
    return {"task": dataclasses.asdict(task), "source": source.to_dict(), "evaluator": evaluator, "threads": threads}


def job(storage: str, search: dict, trials: int, timeout: float | None) -> dict:
    """A worker's second line, once the study is open: ``storage``, ``search`` (``tune.prepare``'s
    keyword arguments, the study's name among them), the study's trial count and timeout."""
    return {"storage": storage, "search": search, "trials": trials, "timeout": timeout}


def start(workers: int, first: dict) -> list[subprocess.Popen]:
    """Start ``workers - 1`` workers (the caller is the first), each given ``first`` (see ``load``)
    at once through its stdin; ``assign`` gives them their share later."""
    gpus = visible_gpus()
    threads = max(1, (os.cpu_count() or 1) // workers)
    children = []
    for i in range(1, workers):
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        else:
            env["OMP_NUM_THREADS"] = str(threads)
        child = subprocess.Popen([sys.executable, "-P", "-c", WORKER_CODE], env=env, stdin=subprocess.PIPE)
        children.append(child)
        _send(child, first)
    return children


def assign(children: list[subprocess.Popen], shares: list[int], second: dict) -> list[subprocess.Popen]:
    """Give each started worker its share (``shares[0]`` is the caller's own) with ``second`` (see
    ``job``); the pipe is kept open, its end tells the worker that this process is gone. A worker
    left without trials is stopped. Returns the workers that run."""
    running = []
    for child, share in zip(children, shares[1:]):
        if share == 0:
            stop([child])
            continue
        running.append(child)
        _send(child, {**second, "share": share})
    return running


def _send(child: subprocess.Popen, line: dict) -> None:
    with contextlib.suppress(BrokenPipeError):  # it ended already (a bug while loading): ``wait`` counts it
        child.stdin.write((json.dumps(line) + "\n").encode())
        child.stdin.flush()


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


@contextlib.contextmanager
def stopped_with(children: list[subprocess.Popen]) -> Iterator[None]:
    """Within: the caller's own share. Leaving it by an exception (Ctrl-C, SIGTERM, an error)
    stops the workers (SIGTERM: each ends its trial under way as failed) and waits for them, so
    that what the caller then says about the study is true."""
    try:
        yield
    except BaseException:
        from . import interrupts

        with interrupts.deferred():  # a second Ctrl-C does not cut the wait short
            stop(children)
        raise


def stop(children: list[subprocess.Popen], grace: float = STOP_GRACE_S) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.wait(grace)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        _close(child)


def wait(children: list[subprocess.Popen]) -> int:
    """Wait for every worker; how many failed."""
    failed = 0
    for child in children:
        failed += child.wait() != 0
        _close(child)
    return failed


def _close(child: subprocess.Popen) -> None:
    with contextlib.suppress(OSError):
        child.stdin.close()


def own_setup(workers: int) -> None:
    """Check the worker count against the machine (``check_workers``), then give the calling
    (first) worker its share of CPU threads. On GPUs it needs nothing: it uses cuda:0, the first
    visible GPU, and the workers it spawns get the others."""
    check_workers(workers)
    if not visible_gpus():
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
