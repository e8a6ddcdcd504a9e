"""The evaluator: a task's model, controller, feature extractor and reference, loaded once, and
``score``, the one place a schedule is scored.

``score`` samples the task's seeds with a schedule applied, rung by rung (each rung adds samples
to the previous ones: no image is drawn twice) and yields FID (and KID) of all samples so far at
each rung. The search's objective, ``evaluate`` and the benchmarks all call it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from tqdm import tqdm

from ..core.controller import SkipController
from ..core.errors import InputError, ReferenceStatsError
from ..core.limits import MAX_BATCH, check_int
from ..core.schedule import RhoSchedule
from ..bundled import FASHION_MNIST
from ..models.source import ModelSource
from ..sampling import SIGMA_SAMPLERS
from ..sampling.samplers import generate_batches, sigma_grid, steps_for_nfe
from . import DEFAULT_FEATURES
from .metrics import (
    DEFAULT_REFERENCE, ReferenceStats, extract_features, fid_from_features, kid_from_features, load_extractor,
    load_images, reference_from_images,
)
from .objectives import objective as objective_of
from .task import CUSTOM, Task, autocast_dtype, resolve_device

CACHE_DIR = Path("studies") / "cache"  # reference features computed from data sets or folders


def check_bundled_reference(model: str, dataset: str | None) -> None:
    """The bundled reference (Fashion-MNIST statistics in EfficientNet-Lite0 features) scores only
    a model trained on Fashion-MNIST, as its record says (``dataset``): against any other model's
    images its FID would measure nothing, so that model needs a reference of its own."""
    if dataset == FASHION_MNIST:
        return
    said = f"its record says {dataset!r}" if dataset else "nothing says it was trained on Fashion-MNIST"
    raise ReferenceStatsError(
        f"the bundled reference (Fashion-MNIST statistics) fits only a model trained on Fashion-MNIST, and {model} "
        f"is not one ({said}): give a reference of its own data: an .npz (skiptune-search reference-stats writes "
        f"Fashion-MNIST's), a folder of real images, or for a text-to-image model the folder configs/coco_prepare.py "
        f"makes", option="reference")


@dataclass
class Rung:
    """The score of a schedule on its first ``n`` samples."""

    n: int
    fid: float
    kid: float | None = None  # when the reference holds features
    features: torch.Tensor | None = None  # all ``n`` samples' features [n, D]
    images: torch.Tensor | None = None  # the first samples (a grid's worth), at the first rung only
    values: dict = field(default_factory=dict)  # an objective's own metric (Objective.measure), by its name


def rung_score(features: torch.Tensor, reference: ReferenceStats, kid: bool = True,
               objective: str | None = None) -> Rung:
    """FID, and (``kid``) KID where the reference has features, of ``features``; and the metric of
    ``objective`` where it has one of its own (``Objective.measure``)."""
    kid = kid_from_features(features, reference) if kid and reference.kid_features is not None else None
    rung = Rung(len(features), fid_from_features(features, reference), kid, features)
    if objective is not None and (measure := objective_of(objective).measure) is not None:
        rung.values[objective] = float(measure(features, reference))
    return rung


SampleFn = Callable[[list[int]], torch.Tensor]  # seeds -> uint8 images [len(seeds), C, H, W]


@dataclass(frozen=True)
class OwnModel:
    """A model of the caller's own (any module the adapters understand) with its own sampling
    loop ``sample(seeds)`` (uint8 images, the same for a seed in every call); ``timestep_to_sigma``
    where the model is called with timesteps, ``sigma_range`` the σ the loop visits."""

    model: torch.nn.Module
    sample: SampleFn
    timestep_to_sigma: Callable | None = None
    sigma_range: tuple[float, float] | None = None


class Evaluator:
    """Loads the model, controller, extractor and reference once; scores schedules.

    The model is ``source`` (a ``ModelSource``; default: ``task.model`` by name, nothing trusted):
    a denoiser sampled on a σ grid by a σ-space sampler, or a diffusers pipeline sampled by its
    own ``__call__`` with the scheduler the task names (``models.pipelines.PipelineRun``); or,
    from Python, an ``OwnModel`` (any model the adapters understand with the caller's own
    ``sample(seeds)``), its task's sampler ``CUSTOM``. A pipeline and the caller's loop are sampled
    alike: by a sample function of seeds, the controller reading σ from the UNet's timestep."""

    def __init__(self, task: Task, batch_size: int = 250, *, source: ModelSource | OwnModel | None = None,
                 feature_weights: str | None = None, device: str = "auto") -> None:
        batch_size = check_int(batch_size, "batch", 1, MAX_BATCH)
        self.task = task
        self.feature_weights = feature_weights
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self._extractor = None
        self._reference = None
        own = isinstance(source, OwnModel)
        if own != (task.sampler == CUSTOM):
            raise InputError(f"a model of your own needs its sample function and a task with sampler {CUSTOM!r}; "
                             f"a model by name needs neither")
        if own:  # the caller's model and sampling loop
            self.model_info = {"name": task.model}
            self.source = None
            self._attach(source.model, source.sample, source.timestep_to_sigma, source.sigma_range)
            return
        source = ModelSource(task.model) if source is None else source
        if not isinstance(source, ModelSource) or source.model != task.model:
            raise InputError(f"the model source {source!r} is not that of the task's model {task.model}",
                             option="model")
        self.source = source
        self._sample = None
        if task.sampler in SIGMA_SAMPLERS:
            self._load_denoiser()
            return
        run = self._load_pipeline()  # a diffusers pipeline, sampled by its own __call__
        self._attach(run.pipe, run.sample, run.timestep_to_sigma, (float(run.sigmas.min()), float(run.sigmas.max())))

    def _attach(self, model, sample: SampleFn, timestep_to_sigma: Callable | None,
                sigma_range: tuple[float, float] | None) -> None:
        self.denoiser, self._sample = model, sample
        self.controller = SkipController(model, timestep_to_sigma)
        self.controller.attach()
        self._sigma_range = sigma_range

    def _load_denoiser(self) -> None:
        """The source's model as a denoiser D(x, σ), on the task's σ grid."""
        task = self.task
        self.steps = steps_for_nfe(task.sampler, task.nfe)
        self.denoiser, self.model_info = self.source.load()
        if task.prompts is not None:
            raise InputError(f"{task.model} takes no text; prompts and guidance are for text-to-image pipelines "
                             f"(Stable Diffusion style)", option="prompts")
        if task.height is not None or task.width is not None:
            raise InputError(f"{task.model} samples at its own size; an image size is for text-to-image pipelines",
                             option="height" if task.height is not None else "width")
        self.denoiser.to(self.device)
        self.controller = SkipController(self.denoiser)
        self.controller.attach()
        self.sigmas = sigma_grid(task.sigma_grid, self.steps, self.model_info["sigma_min"],
                                 self.model_info["sigma_max"], getattr(self.denoiser, "sigma_table", None),
                                 self.model_info["name"])
        self.shape = (self.model_info["channels"], self.model_info["resolution"], self.model_info["resolution"])
        self._sigma_range = (float(self.sigmas[-2]), float(self.sigmas[0]))

    def _load_pipeline(self):
        """``task.model`` as a diffusers pipeline with the task's scheduler at its NFE; ``sigmas``
        are then the σ of each UNet call of a sample, in order, and 0 (the end)."""
        from ..models.pipelines import PipelineRun, is_pipeline_source

        task = self.task
        if not is_pipeline_source(task.model):
            raise InputError(f"sampler {task.sampler} is a diffusers scheduler: it needs a diffusers pipeline model "
                             f"(a folder with model_index.json, or a repo id in the local Hugging Face cache); "
                             f"{task.model} is sampled by heun, euler or dpmpp_2m", option="sampler")
        run = PipelineRun(task.model, task.sampler, task.nfe, prompts=task.prompts, guidance=task.guidance,
                          height=task.height, width=task.width, device=self.device,
                          autocast=autocast_dtype(task.precision))
        self.pipeline, self.model_info, self.steps = run, run.info, run.steps
        self.sigmas = torch.cat([run.sigmas.double(), torch.zeros(1, dtype=torch.float64)])
        return run

    @property
    def call_sigmas(self) -> tuple[float, ...]:
        """The distinct σ at which the sampler calls the model, highest first (Heun calls most of
        them twice); empty for your own sampling loop, whose calls are not known."""
        sigmas = getattr(self, "sigmas", None)
        if sigmas is None:
            return ()
        return tuple(sorted({float(s) for s in sigmas if s > 0}, reverse=True))

    @property
    def sigma_range(self) -> tuple[float, float]:
        """The lowest and highest σ the sampler visits (above 0): where σ knots of a schedule go."""
        if self._sigma_range is None:
            raise InputError("a σ-dependent family needs the σ range your sampler visits (sigma_range)",
                             option="sigma_range")
        return self._sigma_range

    @property
    def extractor(self):
        if self._extractor is None:
            self._extractor = load_extractor(self.task.features, self.feature_weights).to(self.device)
        return self._extractor

    @property
    def reference(self) -> ReferenceStats:
        if self._reference is None:
            if self.task.reference == "bundled":
                if self.task.features != DEFAULT_FEATURES:
                    raise ReferenceStatsError(
                        f"the bundled statistics are {DEFAULT_FEATURES} features of Fashion-MNIST; with "
                        f"{self.task.features} features give reference statistics (an .npz)", option="reference")
                # what the loaded model's record says (a custom model of the caller's has none)
                check_bundled_reference(self.task.model, None if self.task.sampler == CUSTOM
                                        else self.model_info.get("dataset"))
                self._reference = ReferenceStats.load(DEFAULT_REFERENCE)
            elif self.task.reference.endswith(".npz"):
                self._reference = ReferenceStats.load(self.task.reference)
            else:
                images = load_images(self.task.reference)
                self._reference = reference_from_images(images, self.extractor, self.task.features, CACHE_DIR)
            if objective_of(self.task.objective).needs_reference_features and self._reference.kid_features is None:
                raise ReferenceStatsError(
                    f"objective {self.task.objective} needs reference features, and {self.task.reference} holds only "
                    f"mu and sigma: use fashion-mnist:test or a folder of reference images", option="reference")
        return self._reference

    def check_reference(self) -> None:
        """Fail before any sampling when the reference statistics do not fit the extractor's
        features (their size; NaN and inf are refused when they are read)."""
        ref = self.reference
        probe = torch.zeros(1, 3, 64, 64, dtype=torch.uint8, device=self.device)
        size = self.extractor(probe)[0].shape[1]
        if ref.mu.shape[0] != size:
            raise ReferenceStatsError(f"{self.task.reference} holds {ref.mu.shape[0]}-d statistics, but "
                                      f"{self.task.features} features are {size}-d", option="reference")

    # --- sampling ----------------------------------------------------------------------
    def images(self, schedule: RhoSchedule, seeds: Sequence[int] | None = None,
               progress: bool | str = True) -> torch.Tensor:
        """uint8 images of ``seeds`` (default: the task's) sampled with ``schedule``."""
        return torch.cat(list(self._batches(schedule, seeds, progress)))

    def _batches(self, schedule: RhoSchedule, seeds: Sequence[int] | None, progress: bool | str):
        self.controller.use(schedule)
        if self._sample is not None:
            return self._own_batches(list(seeds or self.task.seeds), progress)
        return generate_batches(self.denoiser, self.task.sampler, self.sigmas, list(seeds or self.task.seeds),
                                self.shape, self.batch_size, progress, self.device,
                                self.model_info.get("label_dim", 0), autocast_dtype(self.task.precision))

    def _own_batches(self, seeds: list[int], progress: bool | str) -> Iterator[torch.Tensor]:
        """The caller's ``sample`` on batches of seeds, its output checked."""
        with tqdm(total=len(seeds), desc=progress if isinstance(progress, str) else "sampling", unit="img",
                  disable=not progress, leave=False) as bar:
            for start in range(0, len(seeds), self.batch_size):
                batch = seeds[start:start + self.batch_size]
                with torch.inference_mode():
                    images = self._sample(batch)
                if not (torch.is_tensor(images) and images.dtype == torch.uint8 and images.ndim == 4
                        and len(images) == len(batch) and images.shape[1] in (1, 3)):
                    what = (f"{images.dtype} {list(images.shape)}" if torch.is_tensor(images)
                            else type(images).__name__)
                    raise InputError(f"sample(seeds) returned {what} for {len(batch)} seeds: return uint8 images "
                                     f"[{len(batch)}, C, H, W] with C = 1 or 3, one per seed, in seed order")
                bar.update(len(batch))
                yield images.cpu()

    def features(self, schedule: RhoSchedule, seeds: Sequence[int] | None = None, progress: bool | str = True,
                 keep: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature vectors of the samples of ``seeds`` (default: the task's) and the first ``keep``
        uint8 images (a sample grid); batch by batch, so the N images are never all in memory."""
        features, first = [], []
        for images in self._batches(schedule, seeds, progress):
            features.append(extract_features(images, self.extractor, self.batch_size))
            if sum(map(len, first)) < keep:
                first.append(images)
        return torch.cat(features), torch.cat(first)[:keep]

    # --- scoring -----------------------------------------------------------------------
    def score(self, schedule: RhoSchedule, rungs: Sequence[int] | None = None, seeds: Sequence[int] | None = None,
              progress: bool | str = True, kid: bool = True) -> Iterator[Rung]:
        """Score ``schedule`` on ``seeds`` (default: the task's) at each rung (default: the task's),
        a sample count: each rung samples only the seeds the previous one did not, then yields
        FID (and, with ``kid``, KID) of all samples so far; the first rung also carries the first
        64 images. Held-out scores need FID alone (``kid=False``: KID's kernels grow with N²)."""
        seeds = list(seeds or self.task.seeds)
        rungs = tuple(rungs or self.task.rungs)
        if rungs[-1] > len(seeds):
            raise InputError(f"rung {rungs[-1]} asks for more samples than the {len(seeds)} seeds given")
        self.reference  # chosen and checked before any sampling
        features, done = [], 0
        for rung in rungs:
            label = progress and (f"{progress}, N={rung}" if isinstance(progress, str) else f"N={rung}")
            more, images = self.features(schedule, seeds[done:rung], progress=label)
            features.append(more)
            result = rung_score(torch.cat(features), self.reference, kid, self.task.objective)
            if done == 0:
                result.images = images
            done = rung
            yield result

    def fid(self, schedule: RhoSchedule, progress: bool | str = True, keep: int = 64) -> tuple[float, torch.Tensor]:
        """FID of the task's samples (all at once, no rungs), and the first ``keep`` of them."""
        self.reference  # chosen and checked before any sampling
        features, images = self.features(schedule, progress=progress, keep=keep)
        return fid_from_features(features, self.reference), images
