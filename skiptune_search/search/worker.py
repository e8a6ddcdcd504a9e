"""A worker process of a search (``workers.spawn`` starts it with ``python -P -c``): ``main``
reads its job from stdin (``workers.job``: the task, the model source, the study, its share),
runs its share of the trials and prints one line per trial. Kept apart from ``workers`` (the
parent's side), which ``tune.run`` imports, so that no import runs in a circle."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading


def main() -> None:
    """A worker: read the job from stdin, run its share, print one line per trial. Exit 0, 2 on the
    tool's own error (one line), 130/143 when stopped."""
    from ..core.errors import SkiptuneError
    from . import interrupts

    work = json.loads(_read_line(0))
    interrupts.install()
    threading.Thread(target=_stop_when_parent_ends, daemon=True).start()
    try:
        run(work)
    except KeyboardInterrupt:
        sys.exit(143 if interrupts.state.signum == signal.SIGTERM else 130)
    except SkiptuneError as exc:
        print(f"Error: worker {os.getpid()}: {exc}", file=sys.stderr)
        sys.exit(2)


def _read_line(fd: int) -> bytes:
    """One line from ``fd``, read unbuffered (so no buffered reader is left for the watcher below)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        data += chunk
    return data


def _stop_when_parent_ends() -> None:
    while os.read(0, 1 << 16):  # empty at end of file: the parent closed the pipe, or is gone
        pass
    os.kill(os.getpid(), signal.SIGTERM)


def run(work: dict) -> None:
    import torch

    from ..models.source import ModelSource
    from ..scoring.evaluator import Evaluator
    from ..scoring.task import Task
    from .objective import run_search, trial_line
    from .storage import artifact_dir
    from .tune import prepare

    torch.set_flush_denormal(True)  # as the command does (cli torch_setup)
    if work["threads"]:
        torch.set_num_threads(work["threads"])
    task = Task(**work["task"])
    evaluator = Evaluator(task, source=ModelSource.from_dict(work["source"]), **work["evaluator"])
    evaluator.check_reference()
    search = {**work["search"], "rho_range": tuple(work["search"]["rho_range"])}
    space, study = prepare(evaluator, work["storage"], **search, parallel=True)

    def report(study, trial) -> None:
        if line := trial_line(study, trial, task.objective):
            print(line, flush=True)

    run_search(evaluator, study, space, work["trials"], work["timeout"], on_trial=report,
               artifacts=artifact_dir(work["storage"]), share=work["share"], progress=False)
