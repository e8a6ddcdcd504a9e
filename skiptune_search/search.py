"""The Optuna side: a task (model, sampler, NFE, samples) scored by proxy FID/KID at growing
sample counts (rungs, with pruning), one study per task, family and placement, the ρ = 1
baseline first, every trial persisted as it ends, the best completed trial exported.

Only this module talks to Optuna.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import re
import sqlite3
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import optuna
import sqlalchemy
import torch

from .grids import save_grid
from .metrics import (
    DEFAULT_FEATURES, DEFAULT_REFERENCE, ReferenceStats, ReferenceStatsError, extract_features, fid_from_features,
    kid_from_features, load_extractor, load_images, reference_from_images,
)
from .sampling import (
    NATIVE_SCHEDULERS, NonFiniteSamplesError, check_sigma_grid, default_sigma_grid, generate_batches,
    native_sigmas, seed_range, sigma_grid, steps_for_nfe,
)
from .schedule import FAMILIES, PLACEMENTS, RhoSchedule, SkipInfo, family_params
from .skips import SkipController
from .zoo import DEFAULT_MODEL_NAME, load_denoiser

DEFAULT_STORAGE = "sqlite:///studies/skiptune.db"
CACHE_DIR = Path("studies") / "cache"  # reference features computed from data sets or folders
SQLITE_BUSY_TIMEOUT = 60.0  # seconds a worker waits for another's write lock before giving up
OBJECTIVES = ("fid", "fid_inf", "kid")
DEFAULT_GUIDANCE = 7.5  # classifier-free guidance of text models when none is given (diffusers' SD default)
# what the model's forward runs in: fp32, or bf16 autocast (convolutions and matmuls in bf16; the
# sampler's updates, FID features and statistics stay fp32)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


class StorageError(ValueError):
    """The storage cannot be opened or written."""


class StudyMismatchError(ValueError):
    """An existing study was run with other settings than the ones asked for now."""


@dataclass(frozen=True)
class Task:
    """What one trial generates and how it is scored: every trial of a study shares it."""

    model: str = DEFAULT_MODEL_NAME
    sampler: str = "heun"
    nfe: int = 9
    n: int = 1000  # samples per trial
    seed: int = 0  # trial samples use seeds seed .. seed + n - 1
    features: str = DEFAULT_FEATURES
    reference: str = "bundled"  # 'bundled', an .npz (mu, sigma), 'fashion-mnist:test' or an image folder
    rungs: tuple[int, ...] = ()  # sample counts at which a trial reports FID; the last is n
    objective: str = "fid"  # 'fid' (at n), 'fid_inf' (extrapolated to N -> inf over the rungs) or 'kid'
    sigma_grid: str | None = None  # 'karras' or 'model'; None: the sampler's default (default_sigma_grid)
    prompts: str | None = None  # a text model's prompt file (one per line); seed s uses prompt s mod P
    guidance: float | None = None  # classifier-free guidance scale of a text model (1: none)
    precision: str = "fp32"  # a key of PRECISIONS

    def __post_init__(self) -> None:
        rungs = tuple(self.rungs) or (self.n,)
        if list(rungs) != sorted(set(rungs)) or rungs[0] < 2 or rungs[-1] != self.n:
            raise ValueError(f"rungs {','.join(map(str, rungs))} must increase from at least 2 up to n = {self.n}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if self.objective == "fid_inf" and len(rungs) < 2:
            raise ValueError("objective fid_inf needs at least two rungs (e.g. --rungs 250,1000)")
        object.__setattr__(self, "rungs", rungs)
        grid = self.sigma_grid or default_sigma_grid(self.sampler)
        check_sigma_grid(self.sampler, grid)
        object.__setattr__(self, "sigma_grid", grid)
        if self.prompts is None and self.guidance is not None:
            raise ValueError("--guidance applies to text-to-image models: pass --prompts FILE too")
        if self.prompts is not None:
            guidance = DEFAULT_GUIDANCE if self.guidance is None else float(self.guidance)
            if not guidance >= 0:
                raise ValueError(f"--guidance {self.guidance} must be at least 0 (1 is no guidance)")
            object.__setattr__(self, "guidance", guidance)

    @property
    def seeds(self) -> list[int]:
        return seed_range(self.seed, self.n)

    def scoring_key(self) -> dict:
        """The settings that must match for two FIDs to be comparable (with the prompts' digest,
        so an edited prompt file is another task)."""
        key = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if self.prompts is not None:
            from .prompts import prompts_digest

            key["prompts_sha256"] = prompts_digest(self.prompts)
        return key


def with_legacy_defaults(task_key: dict) -> dict:
    """A stored task key with the fields added since it was written, at the values it ran with."""
    defaults = {"sigma_grid": default_sigma_grid(task_key.get("sampler", "heun")), "prompts": None, "guidance": None,
                "precision": "fp32"}
    return {**defaults, **task_key}


def fid_inf(ns: list[int], fids: list[float]) -> float:
    """FID extrapolated to N -> inf: the intercept of a least-squares line of FID against 1/N
    (Chong & Forsyth 2020); FID's bias is close to linear in 1/N."""
    xs = [1.0 / n for n in ns]
    mx, my = sum(xs) / len(xs), sum(fids) / len(fids)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, fids)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' is the first CUDA GPU when there is one (CUDA_VISIBLE_DEVICES applies), else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", device):
        # MPS and the rest: the σ and ρ arithmetic runs in float64, which MPS lacks
        raise ValueError(f"--device {device}: not a device this tool runs on; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible to torch; use --device cpu")
    index = torch.device(device).index
    if index is not None and index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    return torch.device(device)


class Evaluator:
    """Loads the model, controller, extractor and reference once; scores schedules by FID."""

    def __init__(self, task: Task, batch_size: int = 250, trust_pickle: bool = False,
                 edm_path: str | None = None, feature_weights: str | None = None, device: str = "auto") -> None:
        self.task = task
        self.feature_weights = feature_weights
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.steps = steps_for_nfe(task.sampler, task.nfe)
        self.denoiser, self.model_info = load_denoiser(task.model, trust_pickle, edm_path)
        self._set_prompts()
        self.denoiser.to(self.device)
        self.controller = SkipController(self.denoiser)
        self.controller.attach()
        if task.sampler in NATIVE_SCHEDULERS:  # the σ of the scheduler's own timesteps
            self.sigmas = native_sigmas(self.denoiser, task.sampler, self.steps)
        else:
            self.sigmas = sigma_grid(task.sigma_grid, self.steps, self.model_info["sigma_min"],
                                     self.model_info["sigma_max"], getattr(self.denoiser, "sigma_table", None),
                                     self.model_info["name"])
        self.shape = (self.model_info["channels"], self.model_info["resolution"], self.model_info["resolution"])
        self._extractor = None
        self._reference = None

    def _set_prompts(self) -> None:
        """Give a text model its prompts and guidance; refuse prompts for any other model."""
        from .prompts import read_prompts

        if hasattr(self.denoiser, "set_prompts"):
            if self.task.prompts is None:
                raise ValueError(f"{self.task.model} is a text-to-image model: pass --prompts FILE (one prompt "
                                 f"per line; seed s uses prompt s mod P)")
            self.denoiser.set_prompts(read_prompts(self.task.prompts), self.task.guidance)
        elif self.task.prompts is not None:
            raise ValueError(f"--prompts: {self.task.model} takes no text; --prompts and --guidance are for "
                             f"text-to-image pipelines (Stable Diffusion style)")

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
                        f"the bundled statistics are {DEFAULT_FEATURES} features of Fashion-MNIST; "
                        f"with --features {self.task.features} pass --reference STATS.npz"
                    )
                self._reference = ReferenceStats.load(DEFAULT_REFERENCE)
            elif self.task.reference.endswith(".npz"):
                self._reference = ReferenceStats.load(self.task.reference)
            else:
                images = load_images(self.task.reference)
                self._reference = reference_from_images(images, self.extractor, self.task.features, CACHE_DIR)
            if self.task.objective == "kid" and self._reference.kid_features is None:
                raise ReferenceStatsError(
                    f"objective kid needs reference features, and {self.task.reference} holds only mu and sigma: "
                    f"pass --reference fashion-mnist:test or a folder of reference images"
                )
        return self._reference

    def images(self, schedule: RhoSchedule, seeds: list[int] | None = None,
               progress: bool | str = True) -> torch.Tensor:
        return torch.cat(list(self._batches(schedule, seeds, progress)))

    def _batches(self, schedule: RhoSchedule, seeds: list[int] | None, progress: bool | str):
        """uint8 image batches of ``seeds`` (default: the task's) sampled with ``schedule``."""
        self.controller.use(schedule)
        return generate_batches(self.denoiser, self.task.sampler, self.sigmas, seeds or self.task.seeds, self.shape,
                                self.batch_size, progress, self.device, self.model_info.get("label_dim", 0),
                                PRECISIONS[self.task.precision])

    def features(self, schedule: RhoSchedule, seeds: list[int] | None = None, progress: bool | str = True,
                 keep: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature vectors of the samples of ``seeds`` (default: the task's) and the first ``keep``
        uint8 images (a sample grid); batch by batch, so the N images are never all in memory."""
        features, first = [], []
        for images in self._batches(schedule, seeds, progress):
            features.append(extract_features(images, self.extractor, self.batch_size))
            if sum(map(len, first)) < keep:
                first.append(images)
        return torch.cat(features), torch.cat(first)[:keep]

    def fid(self, schedule: RhoSchedule, progress: bool | str = True, keep: int = 64) -> tuple[float, torch.Tensor]:
        """FID of the task's samples, and the first ``keep`` of them."""
        features, images = self.features(schedule, progress=progress, keep=keep)
        return fid_from_features(features, self.reference), images


# --- search spaces: how trial parameters become a schedule -------------------------------
@dataclass(frozen=True)
class Space:
    """A family, a placement ('search' to let Optuna pick one), ρ bounds and σ knots."""

    family: str = "linear"
    placement: str = "input"
    rho_range: tuple[float, float] = (0.5, 1.5)
    sigma_knots: tuple[float, ...] = ()  # per_noise only

    def as_dict(self) -> dict:
        return {"family": self.family, "placement": self.placement, "rho_range": list(self.rho_range),
                "sigma_knots": list(self.sigma_knots)}

    def baseline(self, skips: list[SkipInfo]) -> dict:
        """Parameters of ρ = 1 everywhere."""
        params: dict = {name: 1.0 for name in family_params(self.family, skips, len(self.sigma_knots))}
        if self.placement == "search":
            params["placement"] = "input"
        return params

    def suggest(self, trial: optuna.Trial, skips: list[SkipInfo]) -> tuple[dict[str, float], str]:
        lo, hi = self.rho_range
        params = {name: trial.suggest_float(name, lo, hi)
                  for name in family_params(self.family, skips, len(self.sigma_knots))}
        placement = (trial.suggest_categorical("placement", list(PLACEMENTS))
                     if self.placement == "search" else self.placement)
        return params, placement

    def schedule(self, arch: str, skips: list[SkipInfo], params: dict, **meta) -> RhoSchedule:
        params = dict(params)
        placement = params.pop("placement", self.placement)
        return RhoSchedule.from_family(self.family, arch, skips, params, sigma_knots=self.sigma_knots,
                                       placement=placement, **meta)


def log_spaced_knots(sigma_min: float, sigma_max: float, k: int) -> tuple[float, ...]:
    """``k`` σ knots evenly spaced in log σ from σ_min to σ_max."""
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    return tuple(math.exp(lo + (hi - lo) * i / (k - 1)) for i in range(k))


# --- storage and studies -----------------------------------------------------------------
def make_storage(url: str, heartbeat: int | None = 60, create: bool = True) -> optuna.storages.BaseStorage:
    """An Optuna storage for a SQLAlchemy URL; SQLite folders are created, with a busy timeout.
    With ``create`` False (commands that only read) a missing SQLite file is an error, not a new
    empty database.

    With ``heartbeat`` (seconds), a running trial beats; one whose worker died (killed, machine
    lost) is marked failed after two missed beats by the next worker that starts, and retried
    with the same parameters (up to 3 times). Completed trials are never touched."""
    kwargs: dict = {}
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        if not create and str(path) != ":memory:" and not path.is_file():
            raise StorageError(f"no study storage at {path}; run 'skiptune-search search' first, or pass the "
                               f"--storage it used")
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT}}
        if str(path) != ":memory:":  # write-ahead log: readers never block the writer (persists in the file)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with contextlib.closing(sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT)) as db:
                    db.execute("PRAGMA journal_mode=WAL")
            except (OSError, sqlite3.Error) as exc:
                raise StorageError(f"cannot open storage {url} ({exc}); check that the folder exists and is "
                                   f"writable, or pass another --storage") from None
    try:
        return _rdb_storage(url, heartbeat, kwargs)
    except (OSError, sqlalchemy.exc.SQLAlchemyError) as exc:
        reason = str(exc).splitlines()[0][:200]
        raise StorageError(f"cannot open storage {url} ({reason}); check that the path or server exists, "
                           f"is reachable and is writable") from None


def retry_from_first_rung(retry: Callable[[optuna.Study, optuna.trial.FrozenTrial], None]):
    """Optuna's retry of a dead worker's trial, minus the successive-halving rungs it passed: the
    retry copies the trial's system attributes, and with them it would skip the first rung's check."""

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        trial = copy.copy(trial)
        trial.system_attrs = {k: v for k, v in trial.system_attrs.items() if not k.startswith("completed_rung_")}
        retry(study, trial)

    return callback


def _rdb_storage(url: str, heartbeat: int | None, kwargs: dict) -> optuna.storages.RDBStorage:
    with warnings.catch_warnings():  # heartbeats and retries are 'experimental' in Optuna's words
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if heartbeat:
            if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):  # Optuna >= 4.9
                kwargs["heartbeat_stale_trial_callback"] = retry_from_first_rung(
                    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3))
            else:
                kwargs["failed_trial_callback"] = retry_from_first_rung(
                    optuna.storages.RetryFailedTrialCallback(max_retry=3))
            kwargs.update(heartbeat_interval=heartbeat, grace_period=2 * heartbeat)
        return optuna.storages.RDBStorage(url, **kwargs)


def artifact_dir(storage_url: str) -> Path:
    """Where trial artifacts (sample grids) go: beside a SQLite file, else studies/artifacts."""
    if storage_url.startswith("sqlite:///") and storage_url != "sqlite:///:memory:":
        return Path(storage_url[len("sqlite:///"):]).parent / "artifacts"
    return Path("studies") / "artifacts"


def default_study_name(task: Task, space: Space) -> str:
    model = Path(task.model).name if task.model != DEFAULT_MODEL_NAME else task.model
    grid = "" if task.sigma_grid == default_sigma_grid(task.sampler) else f"-{task.sigma_grid}grid"
    cfg = f"-cfg{task.guidance:g}" if task.prompts is not None else ""
    return f"{model}-{task.sampler}{grid}-nfe{task.nfe}{cfg}-{space.family}-{space.placement}"


OPTIMIZERS = ("tpe", "cmaes", "gp", "random", "grid")
PAPER_RAMP = {"rho_inner": 0.8, "rho_outer": 1.0}  # the paper's shape: deep skips damped, outer kept


def grid_values(points: int, lo: float = 0.5, hi: float = 1.5) -> list[float]:
    """``points`` evenly spaced values from ``lo`` to ``hi``, rounded so that 0.6 is 0.6."""
    return [round(lo + (hi - lo) * i / (points - 1), 6) for i in range(points)]


def make_sampler(optimizer: str, space: Space, skips: list[SkipInfo], seed: int,
                 grid_points: int = 11) -> optuna.samplers.BaseSampler:
    """The Optuna sampler that proposes trials; 'grid' spans each ρ with ``grid_points`` values."""
    with warnings.catch_warnings():  # multivariate TPE and GP are 'experimental' in Optuna's words
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _make_sampler(optimizer, space, skips, seed, grid_points)


def _make_sampler(optimizer: str, space: Space, skips: list[SkipInfo], seed: int,
                  grid_points: int) -> optuna.samplers.BaseSampler:
    if optimizer == "tpe":
        # constant liar: parallel workers do not all propose next to the same running trial
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5, multivariate=True, constant_liar=True)
    if optimizer == "cmaes":
        # CMA-ES starts at the centre of the box (ρ = 1 for the default [0.5, 1.5]); Optuna deprecated x0
        return optuna.samplers.CmaEsSampler(seed=seed)
    if optimizer == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if optimizer == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if optimizer == "grid":
        values = grid_values(grid_points, *space.rho_range)
        grid: dict[str, list] = {n: values for n in family_params(space.family, skips, len(space.sigma_knots))}
        if space.placement == "search":
            grid["placement"] = list(PLACEMENTS)
        return optuna.samplers.GridSampler(grid, seed=seed)
    raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")


def unpruned_rungs(rungs: Sequence[int], reduction_factor: int = 3) -> list[int]:
    """Rungs before the last that successive halving never checks: it prunes only at N = the
    first rung × factor^k, so the others report FID (and feed FID∞) but cannot prune."""
    checked, r = set(), rungs[0]
    while r < rungs[-1]:
        checked.add(r)
        r *= reduction_factor
    return [r for r in rungs[:-1] if r not in checked]


def open_study(storage: optuna.storages.BaseStorage, name: str, task: Task, space: Space,
               controller: SkipController, seed: int, optimizer: str = "tpe",
               parallel: bool = False) -> optuna.Study:
    """Create the study, or load it and check it was run with the same task and space. A new
    study gets the ρ = 1 baseline first, then (linear family) the paper-style ramp.

    ``seed`` makes a new study's search reproducible. A study resumed, or shared by ``parallel``
    workers, reseeds its optimizer from the system instead: with the same seed it would propose
    the points it proposed before (all of them, for random search)."""
    sampler = make_sampler(optimizer, space, controller.skips, seed)
    pruner = (optuna.pruners.SuccessiveHalvingPruner(min_resource=task.rungs[0], reduction_factor=3)
              if len(task.rungs) > 1 else optuna.pruners.NopPruner())
    study = optuna.create_study(storage=storage, study_name=name, direction="minimize",
                                sampler=sampler, pruner=pruner, load_if_exists=True)
    trials = study.get_trials(deepcopy=False)
    if parallel or trials:
        study.sampler.reseed_rng()
    settings = {"task": task.scoring_key(), **space.as_dict()}
    layout = {"arch": controller.arch, "skips": [s.as_dict() for s in controller.skips]}
    old = study.user_attrs.get("settings")
    if old is None:
        study.set_user_attr("settings", settings)
        study.set_user_attr("layout", layout)
    elif (old := {**old, "task": with_legacy_defaults(old["task"])}) != json.loads(json.dumps(settings)):
        flat_old, flat_new = _flatten(old), _flatten(json.loads(json.dumps(settings)))
        diff = [f"{k}: {flat_old.get(k)} (now {v})" for k, v in flat_new.items() if flat_old.get(k) != v]
        raise StudyMismatchError(
            f"study {name!r} exists with other settings ({'; '.join(diff)}); "
            f"use the same settings to resume it, or pass --study NEW_NAME"
        )
    weights, stored = weights_fingerprint(controller.unet), study.user_attrs.get("weights")
    if stored is None:  # a new study, or one from before weights were recorded
        study.set_user_attr("weights", weights)
    elif stored != weights:  # the same model path with other weights: retrained in place
        raise StudyMismatchError(
            f"study {name!r} was run with other weights of {task.model} (retrained, or loaded in another "
            f"precision), so its FIDs do not compare with this model's; pass --study NEW_NAME"
        )
    # the baseline and the ramp come first; one that Ctrl-C or a crash stopped before it ended
    # (failed, not retried) is queued again when the study resumes
    firsts = [("baseline", space.baseline(controller.skips))]
    lo, hi = space.rho_range
    if space.family == "linear" and optimizer != "grid" and all(lo <= v <= hi for v in PAPER_RAMP.values()):
        firsts.append(("paper_ramp", dict(PAPER_RAMP, **({"placement": "input"} if space.placement == "search" else {}))))
    pending = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
    for attr, params in firsts:
        if not any(t.user_attrs.get(attr) and (_finished(t) or t.state in pending) for t in trials):
            study.enqueue_trial(params, user_attrs={attr: True})
    return study


def weights_fingerprint(module: torch.nn.Module, per_tensor: int = 256) -> str:
    """16 hex digits over each parameter's and buffer's name, shape, dtype and the bytes of up to
    ``per_tensor`` evenly strided values: retraining changes it, the device does not, and reading
    a few values per tensor keeps it quick for a billion-parameter UNet."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().reshape(-1)
        picked = flat[:: max(1, flat.numel() // per_tensor)].cpu().contiguous()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(picked.view(torch.uint8).numpy().tobytes() if picked.numel() else b"")
    return digest.hexdigest()[:16]


def study_settings(study: optuna.Study) -> dict:
    """The task and space a study was run with; a one-line error for a study of another tool."""
    settings = study.user_attrs.get("settings")
    if settings is None:
        raise ValueError(f"study {study.study_name!r} was not made by skiptune-search (it holds no task "
                         f"settings); pick a study that 'skiptune-search studies' lists")
    return settings


def study_space(study: optuna.Study) -> Space:
    s = study_settings(study)
    return Space(s["family"], s["placement"], tuple(s["rho_range"]), tuple(s.get("sigma_knots", ())))


def _flatten(settings: dict) -> dict:
    """{'task': {'n': 1}, 'family': 'linear'} -> {'n': 1, 'family': 'linear'}."""
    flat = dict(settings.get("task", {}))
    flat.update({k: v for k, v in settings.items() if k != "task"})
    return flat


def study_layout(study: optuna.Study) -> tuple[str, list[SkipInfo]]:
    layout = study.user_attrs.get("layout")
    if not layout:
        raise ValueError(f"study {study.study_name!r} was not made by skiptune-search (no skip layout)")
    return layout["arch"], [SkipInfo(**s) for s in layout["skips"]]


def run_search(
    evaluator: Evaluator,
    study: optuna.Study,
    space: Space,
    trials: int,
    timeout: float | None = None,
    on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
    artifacts: Path | None = None,
    share: int | None = None,
    progress: bool = True,
) -> optuna.Study:
    """Run trials until the study holds ``trials`` finished (complete, pruned or failed) trials,
    or, for one of several workers, exactly ``share`` trials.

    With ``artifacts`` (a folder), each completed trial uploads a grid of its first 64 samples as
    an Optuna artifact, which optuna-dashboard shows on the trial's page."""
    from optuna.artifacts import FileSystemArtifactStore, upload_artifact

    store = None
    if artifacts is not None:
        artifacts.mkdir(parents=True, exist_ok=True)
        store = FileSystemArtifactStore(str(artifacts))
    arch, skips = evaluator.controller.arch, evaluator.controller.skips
    task = evaluator.task

    def objective(trial: optuna.Trial) -> float:
        params, placement = space.suggest(trial, skips)
        schedule = space.schedule(arch, skips, {**params, "placement": placement})
        start = time.perf_counter()
        trial.set_user_attr("rho", schedule.rho)
        # the bar counts finished trials, not trial numbers: a retried trial of a dead worker has a number too
        label = progress and f"trial {finished_trials(study) + 1}/{trials}"
        features, done, fids, kids = [], 0, {}, {}
        for k, rung in enumerate(task.rungs):
            # each rung adds samples to the previous ones: no image is generated twice
            try:
                more, images = evaluator.features(schedule, task.seeds[done:rung],
                                                  progress=label and f"{label}, N={rung}")
            except NonFiniteSamplesError as exc:
                trial.set_user_attr("fail_reason", str(exc))
                raise
            features.append(more)
            grid = images[:64] if done == 0 else grid
            done = rung
            so_far = torch.cat(features)
            fids[rung] = fid_from_features(so_far, evaluator.reference)
            trial.set_user_attr("fid_at", {str(n): v for n, v in fids.items()})
            if evaluator.reference.kid_features is not None:
                kids[rung] = kid_from_features(so_far, evaluator.reference)
                trial.set_user_attr("kid_at", {str(n): v for n, v in kids.items()})
            trial.set_user_attr("wall_seconds", round(time.perf_counter() - start, 2))
            # rungs report FID (KID for the kid objective): FID∞ needs every rung
            value, metric = (kids[rung], "KID") if task.objective == "kid" else (fids[rung], "FID")
            trial.report(value, step=rung)
            # the pruner sees every rung; the ρ = 1 trial, the reference of every change, is never cut short
            # (it runs behind the ramp when a resumed study queues it again)
            if k < len(task.rungs) - 1 and trial.should_prune() and not trial.user_attrs.get("baseline"):
                raise optuna.TrialPruned(f"{metric} {value:.4g} at N={rung}")
        trial.set_user_attr("fid", fids[task.n])
        trial.set_user_attr("n", task.n)
        trial.set_user_attr("seeds", f"{task.seed}-{task.seed + task.n - 1}")
        if kids:
            trial.set_user_attr("kid", kids[task.n])
        if len(fids) > 1:
            trial.set_user_attr("fid_inf", fid_inf(list(fids), list(fids.values())))
        if store is not None:
            with tempfile.TemporaryDirectory() as tmp:
                path = save_grid(grid, Path(tmp) / f"trial-{trial.number + 1}-samples.png", nrow=8)
                upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial, mimetype="image/png")
        return {"fid": fids[task.n], "fid_inf": trial.user_attrs.get("fid_inf"), "kid": kids.get(task.n)}[task.objective]

    def stop_at_total(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        # other processes (workers, machines) add trials too: --trials is the study's total
        if finished_trials(study) >= trials:
            study.stop()

    remaining = trials - finished_trials(study) if share is None else share
    if remaining > 0:
        callbacks = [*([on_trial] if on_trial else []), stop_at_total]
        study.optimize(objective, n_trials=remaining, timeout=timeout, callbacks=callbacks,
                       catch=(NonFiniteSamplesError,), gc_after_trial=False)
    return study


def finished_trials(study: optuna.Study) -> int:
    """Trials that ran to an end: completed, pruned, or failed for a reason of their own (NaN
    samples). A trial failed because its worker died does not count: it is retried."""
    return sum(map(_finished, study.get_trials(deepcopy=False)))


def _finished(trial: optuna.trial.FrozenTrial) -> bool:
    """Completed, pruned, or failed for a reason of its own (not interrupted, not a dead worker)."""
    return (trial.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
            or (trial.state == optuna.trial.TrialState.FAIL and "fail_reason" in trial.user_attrs))


def params_at_edge(params: dict, rho_range: tuple[float, float], margin: float = 0.02) -> list[str]:
    """The ρ parameters of ``params`` within ``margin`` of the range's width of one of its bounds,
    as 'name = value': an optimum there may lie outside the searched range."""
    lo, hi = rho_range
    edge = margin * (hi - lo)
    return [f"{k} = {v:.3f}" for k, v in params.items()
            if isinstance(v, float) and (v - lo <= edge or hi - v <= edge)]


def baseline_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.user_attrs.get("baseline"):
            return t
    return None


def export_best(study: optuna.Study, storage_url: str) -> RhoSchedule:
    """The best completed trial of ``study`` as a schedule, with where it came from."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise ValueError(f"study {study.study_name!r} has no completed trial yet; run 'skiptune-search search' first")
    best = min(complete, key=lambda t: t.value)
    task = with_legacy_defaults(study_settings(study)["task"])
    arch, skips = study_layout(study)
    base = baseline_trial(study)
    tuned_for = {"model": task["model"], "sampler": task["sampler"], "nfe": task["nfe"],
                 "sigma_grid": task["sigma_grid"], "precision": task["precision"]}
    if task["prompts"] is not None:
        tuned_for.update(prompts=task["prompts"], guidance=task["guidance"])
    return study_space(study).schedule(
        arch, skips, best.params,
        tuned_for=tuned_for,
        metric={"name": task.get("objective", "fid"), "features": task["features"], "n": task["n"],
                "seeds": f"{task['seed']}-{task['seed'] + task['n'] - 1}", "value": best.value,
                "baseline": base.value if base else None},
        source={"study": study.study_name, "trial": best.number, "storage": storage_url},
    )
