"""A worker process of a search (``workers.start`` starts it with ``python -P -c``): ``main``
reads its first line from stdin and loads the model (``workers.load``) while the parent loads its
own, then its second (``workers.job``: the study, its share), runs its share of the trials and
prints one line per trial. Kept apart from ``workers`` (the parent's side), which ``tune.run``
imports, so that no import runs in a circle."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading


def main() -> None:
    """A worker: load, then read the job and run its share, printing one line per trial. Exit 0
    (also when the parent closed the pipe before giving a share), 2 on the tool's own error (one
    line), 130/143 when stopped."""
    from ..core.errors import SkiptuneError
    from . import interrupts

    interrupts.install()  # first: a worker stopped while it loads ends at once, quietly
    lines = _Lines(0)
    try:
        failed, evaluator = None, None
        try:
            evaluator = load(json.loads(lines.next()))
        except SkiptuneError as exc:  # said only if the parent goes on regardless (it fails the same way)
            failed = exc
        interrupts.check()  # stopped while loading, the signal swallowed by an import's clean-up
        second = lines.next()
        if not second:  # the parent ended, or failed, before giving a share
            return
        threading.Thread(target=_stop_when_parent_ends, daemon=True).start()
        if failed is not None:
            raise failed
        run(evaluator, json.loads(second))
    except KeyboardInterrupt:
        sys.exit(143 if interrupts.state.signum == signal.SIGTERM else 130)
    except SkiptuneError as exc:
        print(f"Error: worker {os.getpid()}: {exc}", file=sys.stderr)
        sys.exit(2)


class _Lines:
    """The lines of ``fd``, read unbuffered (so no buffered reader is left for the watcher below)."""

    def __init__(self, fd: int) -> None:
        self.fd, self.rest = fd, b""

    def next(self) -> bytes:
        """The next line, or b"" at the end of the file."""
        while b"\n" not in self.rest:
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return b""
            self.rest += chunk
        line, _, self.rest = self.rest.partition(b"\n")
        return line + b"\n"


def _stop_when_parent_ends() -> None:
    while os.read(0, 1 << 16):  # empty at end of file: the parent closed the pipe, or is gone
        pass
    os.kill(os.getpid(), signal.SIGTERM)


def load(first: dict):
    """The evaluator of the search, its model loaded (``workers.load``)."""
    import torch

    from ..models.source import ModelSource
    from ..scoring.evaluator import Evaluator
    from ..scoring.task import Task

    torch.set_flush_denormal(True)  # as the command does (cli torch_setup)
    if first["threads"]:
        torch.set_num_threads(first["threads"])
    evaluator = Evaluator(Task(**first["task"]), source=ModelSource.from_dict(first["source"]), **first["evaluator"])
    evaluator.check_reference()
    return evaluator


def run(evaluator, work: dict) -> None:
    """Run this worker's share of the study (``workers.job``)."""
    from .objective import run_search, trial_line
    from .storage import artifact_dir
    from .tune import prepare

    search = {**work["search"], "rho_range": tuple(work["search"]["rho_range"])}
    space, study = prepare(evaluator, work["storage"], **search, parallel=True)

    def report(study, trial) -> None:
        if line := trial_line(study, trial, evaluator.task.objective):
            print(line, flush=True)

    run_search(evaluator, study, space, work["trials"], work["timeout"], on_trial=report,
               artifacts=artifact_dir(work["storage"]), share=work["share"], progress=False)
