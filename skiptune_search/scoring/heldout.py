"""Held-out evaluation: does a schedule's gain hold on seeds the search never saw?

The untuned model and the schedule sample the same held-out seeds (paired); the seeds are cut
into independent blocks, FID is computed per block, and the paired differences give a mean and
a Student-t 95% interval. FID on all N samples is reported too (it is biased by N, but equally
for both). The gain holds when the whole interval of (tuned − untuned) lies below zero.
"""

from __future__ import annotations

import math
import statistics

from ..core.errors import InputError
from ..core.schedule import RhoSchedule
from .evaluator import Evaluator
from .metrics import fid_from_features


def _interval(values: list[float]) -> dict:
    """Mean and two-sided 95% Student-t interval of independent values."""
    from scipy.stats import t

    mean = statistics.fmean(values)
    half = t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "low": float(mean - half), "high": float(mean + half)}


def evaluate_schedule(evaluator: Evaluator, schedule: RhoSchedule, seeds: list[int], blocks: int) -> dict:
    """FID of the untuned model and of ``schedule`` on ``seeds``, per block and pooled."""
    if blocks < 2 or len(seeds) < 2 * blocks:
        raise InputError(f"need at least 2 blocks of 2 samples; got {len(seeds)} samples in {blocks} blocks",
                         option="blocks")
    size = len(seeds) // blocks
    seeds = seeds[: size * blocks]
    result: dict = {"n": len(seeds), "blocks": blocks, "block_size": size,
                    "seeds": f"{seeds[0]}-{seeds[-1]}", "sampler": evaluator.task.sampler, "nfe": evaluator.task.nfe,
                    "features": evaluator.task.features}
    per_block = {}
    for label, sched in (("baseline", evaluator.controller.identity()), ("tuned", schedule)):
        pooled = next(evaluator.score(sched, rungs=(len(seeds),), seeds=seeds, progress=f"{label}", kid=False))
        features = pooled.features
        block_fids = [fid_from_features(features[b * size:(b + 1) * size], evaluator.reference) for b in range(blocks)]
        per_block[label] = block_fids
        result[label] = {"fid": pooled.fid, "block_fid": _interval(block_fids),
                         "block_fids": block_fids}
    diffs = [t - b for t, b in zip(per_block["tuned"], per_block["baseline"])]
    result["difference"] = _interval(diffs)
    result["gain_holds"] = bool(result["difference"]["high"] < 0)
    return result
