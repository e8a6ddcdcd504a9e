"""diffusers pipelines, sampled by the pipeline itself.

A pipeline folder (``model_index.json``) or a Hugging Face repo id in the local cache is loaded
offline by diffusers' own classes. ``PipelineRun`` samples it the way a user of the pipeline
would: the pipeline's own ``__call__`` with the scheduler the task names
(``Class.from_config(pipe.scheduler.config)``), one ``torch.Generator`` per sample seeded with its
seed, the prompt of each seed (seed s uses prompt s mod P) and the guidance scale as the
pipeline's own arguments, and its tensor output. The skip controller hooks ``pipe.unet`` and reads
each call's σ from its timestep through the pipeline's noise schedule (``alphas_cumprod``).

Supported: Stable Diffusion 1.x and 2.x (ε and v; ``StableDiffusionPipeline``), SDXL
(``StableDiffusionXLPipeline``: both text encoders, its micro-conditioning built by the pipeline
from the image size) and unconditional ``DDPMPipeline``/``DDIMPipeline``. An unconditional
pipeline can also be sampled in σ-space by the EDM samplers (``load_vp_denoiser``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import os
import pickle
from pathlib import Path
from typing import Iterator, Sequence

import torch

from ..core.errors import InputError, ModelLoadError, NonFiniteSamplesError
from ..core.files import MAX_TEXT_BYTES, check_input_file
from ..sampling import SCHEDULERS, scheduler_class
from ..sampling.samplers import impossible_nfe
from .denoisers import DiffusersVPPrecond, timestep_to_sigma_from_scheduler
from ..bundled import DEFAULT_MODEL_NAME, MODEL_INFO_FILE

TEXT_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
UNCONDITIONAL_PIPELINES = ("DDPMPipeline", "DDIMPipeline")
# parts plain sampling never calls: the safety checker (it would black out flagged images, which
# changes FID) and what feeds it or IP-adapters; they are not loaded
UNUSED_PARTS = ("safety_checker", "feature_extractor", "image_encoder")
UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")


# --- where a pipeline is ------------------------------------------------------------------------
def looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/"))


def is_pipeline_source(model: str | os.PathLike | None) -> bool:
    """A diffusers pipeline: a folder with model_index.json (and no skiptune_model.json), or a
    name that is no path here and looks like a Hugging Face repo id."""
    if model in (None, DEFAULT_MODEL_NAME) or str(model).endswith(".pkl"):
        return False
    path = Path(model)
    if (path / MODEL_INFO_FILE).is_file():
        return False
    return (path / "model_index.json").is_file() or (not path.exists() and looks_like_repo_id(str(model)))


def _first_mismatch(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
    return (lines[0] if lines else str(exc).splitlines()[0])[:200]


def offline_error(source: str, exc: Exception) -> ModelLoadError:
    if isinstance(exc, pickle.UnpicklingError):  # torch's weights_only refused a pickled .bin: no code is run
        return ModelLoadError(f"{source} holds a pickled .bin whose contents are not plain tensors, and this tool "
                              f"runs no code from a model's files: use its .safetensors weights (or convert them)",
                              option="model")
    why = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
    if Path(source).exists():
        return ModelLoadError(f"diffusers model {source} could not be read ({why})", option="model")
    return ModelLoadError(f"diffusers model {source} is not in the local Hugging Face cache ({why}); on a machine "
                          f"with internet run: hf download {source}", option="model")


def pipeline_folder(source: str) -> str:
    """The folder of a pipeline: ``source`` itself, or a repo id's snapshot in the local Hugging
    Face cache (found by its model_index.json; partial downloads are fine, nothing is fetched)."""
    if Path(source).exists() or not looks_like_repo_id(source):
        return source
    from huggingface_hub import try_to_load_from_cache

    index = try_to_load_from_cache(source, "model_index.json")
    if not isinstance(index, str):
        raise offline_error(source, FileNotFoundError("no model_index.json of it in the cache"))
    return str(Path(index).parent)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """diffusers' and transformers' loggers at errors only and their loading bars off: notes on
    scheduler configs and on prompts truncated to the tokenizer's length (the pipeline truncates
    them) would repeat at every batch."""
    loggers = [importlib.import_module("diffusers.utils.logging")]
    if importlib.util.find_spec("transformers") is not None:
        loggers.append(importlib.import_module("transformers.utils.logging"))
    saved = [(log, log.get_verbosity(), log.is_progress_bar_enabled()) for log in loggers]
    for log in loggers:
        log.set_verbosity_error()
        log.disable_progress_bar()
    try:
        yield
    finally:
        for log, level, bars in saved:
            log.set_verbosity(level)
            if bars:
                log.enable_progress_bar()


def read_index(source: str) -> tuple[str, dict]:
    """The pipeline's folder and its model_index.json, offline."""
    import warnings

    from diffusers import DiffusionPipeline

    folder = pipeline_folder(source)
    check_input_file(Path(folder) / "model_index.json", "pipeline index", MAX_TEXT_BYTES, error=ModelLoadError,
                     option="model")  # a FIFO there would hang diffusers' reader
    try:
        with warnings.catch_warnings():  # huggingface_hub's deprecation notes about arguments diffusers passes
            warnings.simplefilter("ignore", UserWarning)
            index = DiffusionPipeline.load_config(folder, local_files_only=True)
    except (OSError, ValueError, pickle.UnpicklingError) as exc:
        raise offline_error(source, exc) from None
    return folder, index


def _parts(index: dict) -> dict[str, tuple[str, str]]:
    """The pipeline's parts that are present: name -> (library, class)."""
    return {k: tuple(v) for k, v in index.items()
            if not k.startswith("_") and isinstance(v, (list, tuple)) and len(v) == 2 and v[0] is not None}


def pipeline_kind(source: str, index: dict) -> str:
    """'text' (Stable Diffusion 1.x/2.x, SDXL) or 'unconditional' (DDPM, DDIM), from
    model_index.json alone; a pipeline this tool cannot drive is a one-line error."""
    name = index.get("_class_name")
    name = "/".join(name) if isinstance(name, (list, tuple)) else str(name)
    parts = _parts(index)
    if parts.get("unet", (None, None))[1] not in UNET_CLASSES:
        transformer = next((f"{part} {cls}" for part, (_, cls) in parts.items() if "Transformer" in cls), None)
        if transformer:
            raise ModelLoadError(f"{source} is a {name} whose denoiser is a transformer ({transformer}): it has no "
                                 f"long skips to tune; skiptune-search drives UNet pipelines (Stable Diffusion 1.x/2.x, "
                                 f"SDXL, DDPM/DDIM)", option="model")
        raise ModelLoadError(f"{source} is a {name} with no UNet2DModel or UNet2DConditionModel 'unet': it has no "
                             f"long skips this tool can find", option="model")
    if name in TEXT_PIPELINES:
        return "text"
    if name in UNCONDITIONAL_PIPELINES:
        return "unconditional"
    raise ModelLoadError(f"{source} is a {name}, which skiptune-search cannot sample; it drives "
                         f"{', '.join(TEXT_PIPELINES + UNCONDITIONAL_PIPELINES)}", option="model")


# files a part needs: a config, and weights by their names without variants (what from_pretrained reads)
_WEIGHTS = {"diffusers": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                          "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json"),
            "transformers": ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                             "pytorch_model.bin.index.json")}


def _missing_files(folder: str, index: dict) -> list[str]:
    """Files of the parts the pipeline loads that are not on disk, as paths inside the repo (a
    part's own folder, or the top level as diffusers falls back to for flat repos)."""
    missing = []
    for part, (library, cls) in _parts(index).items():
        if part in UNUSED_PARTS:
            continue
        places = [Path(folder) / part, Path(folder)]
        if cls.endswith("Scheduler"):
            needs = [("scheduler_config.json",)]
        elif "Tokenizer" in cls:
            needs = [("vocab.json", "tokenizer.json", "spiece.model", "tokenizer_config.json")]
        elif library in _WEIGHTS:
            needs = [("config.json",), _WEIGHTS[library]]
        else:
            continue
        for options in needs:
            if not any((place / name).is_file() for place in places for name in options):
                missing.append(f"{part}/*" if "Tokenizer" in cls else f"{part}/{options[0]}")
    return missing


def check_part_files(folder: str, index: dict, parts: Sequence[str] | None = None) -> None:
    """Every file of the pipeline's parts (``parts``: all it loads) is a regular file, and its
    configs and vocabularies (.json, .txt) are bounded (``core.files``): a FIFO or device among
    them would hang or exhaust diffusers' readers; a config that is no JSON is one line."""
    for part in parts or [p for p in _parts(index) if p not in UNUSED_PARTS]:
        place = Path(folder) / part
        if not place.is_dir():
            continue
        for path in sorted(place.iterdir()):
            if path.is_dir():
                continue
            check_input_file(path, f"{part} file", MAX_TEXT_BYTES if path.suffix in (".json", ".txt") else None,
                             error=ModelLoadError, option="model")


def load_pipeline(source: str):
    """The pipeline of ``source`` (a folder, or a repo id in the local cache), offline; checked
    before any weights are read: its type, its files (missing ones are named with the command that
    fetches them), the packages it needs."""
    folder, index = read_index(source)
    pipeline_kind(source, index)
    missing = _missing_files(folder, index)
    if missing:
        fetch = (f"on a machine with internet run: hf download {source} --include "
                 + " ".join(f'"{m}"' for m in missing) if not Path(source).exists()
                 else "copy them from the model's repository into the folder")
        raise ModelLoadError(f"{source} lacks {', '.join(missing)}, which its {index.get('_class_name')} needs; "
                             f"{fetch}", option="model")
    check_part_files(folder, index)
    needs = {library for part, (library, _) in _parts(index).items() if part not in UNUSED_PARTS}
    for library in sorted(needs - {"diffusers"}):
        if importlib.util.find_spec(library) is None:
            raise ModelLoadError(f"{source} needs the package {library} (its text encoders): "
                                 f"pip install 'skiptune-search[text]'", option="model")
    import diffusers

    skipped = {part: None for part in UNUSED_PARTS if part in index}
    if "requires_safety_checker" in index:
        skipped["requires_safety_checker"] = False
    if "add_watermarker" in inspect.signature(getattr(diffusers, index["_class_name"]).__init__).parameters:
        # SDXL's watermark, on only where invisible-watermark is installed: the images must not depend on that
        skipped["add_watermarker"] = False
    try:
        with _quiet():
            pipe = diffusers.DiffusionPipeline.from_pretrained(folder, local_files_only=True, **skipped)
    except (OSError, ValueError, pickle.UnpicklingError) as exc:
        raise offline_error(source, exc) from None
    except RuntimeError as exc:  # torch's load_state_dict: a part's config.json does not describe its weights
        if not str(exc).startswith("Error(s) in loading state_dict"):
            raise
        raise ModelLoadError(f"{source}: a config.json does not match its weights ({_first_mismatch(exc)}); copy the "
                             f"model's files again from one repository", option="model") from None
    pipe.unet.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline_unet(source: str) -> torch.nn.Module:
    """The UNet of a pipeline alone (what ``inspect`` reads), offline: no text encoder or VAE is
    read or needed."""
    folder, index = read_index(source)
    pipeline_kind(source, index)
    import diffusers

    cls = index["unet"][1]
    subfolder = "unet" if (Path(folder) / "unet").is_dir() else None  # flat repos keep it at the top
    check_part_files(folder, index, ["unet"])
    try:
        with _quiet():
            unet = getattr(diffusers, cls).from_pretrained(folder, subfolder=subfolder, local_files_only=True)
    except (OSError, ValueError, pickle.UnpicklingError) as exc:
        raise offline_error(source, exc) from None
    except RuntimeError as exc:  # torch's load_state_dict: a part's config.json does not describe its weights
        if not str(exc).startswith("Error(s) in loading state_dict"):
            raise
        raise ModelLoadError(f"{source}: a config.json does not match its weights ({_first_mismatch(exc)}); copy the "
                             f"model's files again from one repository", option="model") from None
    return unet.eval().requires_grad_(False)


def own_scheduler(source: str) -> str | None:
    """The scheduler class a text-to-image pipeline carries (model_index.json's 'scheduler'), with
    which it samples when no sampler is named; None for an unconditional pipeline (sampled in
    σ-space by default) or one that names none."""
    _, index = read_index(source)
    if pipeline_kind(source, index) != "text":
        return None
    scheduler = _parts(index).get("scheduler")
    return scheduler[1] if scheduler and isinstance(scheduler[1], str) else None


def load_vp_denoiser(source: str) -> tuple[torch.nn.Module, dict]:
    """An unconditional DDPM-family pipeline's UNet as a denoiser D(x, σ) in EDM's σ-space (for the
    σ-space samplers), with its info. A text-to-image pipeline is sampled by its own __call__."""
    _, index = read_index(source)
    if pipeline_kind(source, index) == "text":
        raise InputError(f"{source} is a text-to-image {index.get('_class_name')}, sampled by its own __call__: "
                         f"choose a diffusers scheduler as its sampler ({', '.join(SCHEDULERS)}, or a scheduler "
                         f"class name); heun, euler and dpmpp_2m sample unconditional models in σ-space",
                         option="sampler")
    pipe = load_pipeline(source)
    scheduler = pipe.scheduler
    denoiser = DiffusersVPPrecond(pipe.unet, _noise_schedule(source, scheduler), scheduler.config.prediction_type)
    size = pipe.unet.config.sample_size
    info = {"name": source, "precond": "vp-" + scheduler.config.prediction_type,
            "resolution": int(size if isinstance(size, int) else size[0]), "channels": int(pipe.unet.config.in_channels),
            "sigma_min": denoiser.sigma_min, "sigma_max": denoiser.sigma_max}
    return denoiser, info


def _noise_schedule(source: str, scheduler) -> torch.Tensor:
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        raise ModelLoadError(f"{source}: its {type(scheduler).__name__} holds no DDPM noise schedule "
                             f"(alphas_cumprod), so σ of its timesteps is unknown", option="model")
    return alphas


# --- schedulers ---------------------------------------------------------------------------------
def make_scheduler(pipe, sampler: str, source: str):
    """diffusers' scheduler ``sampler`` (short or class name) built from the pipeline's scheduler
    config; one the config does not fit (not among its ``compatibles``) is a one-line error."""
    import diffusers

    own = type(pipe.scheduler)
    compatible = {own.__name__, *(c.__name__ for c in pipe.scheduler.compatibles)}
    name = scheduler_class(sampler)
    cls = getattr(diffusers, name, None)
    if cls is None or name not in compatible:
        shorts = [k for k, v in SCHEDULERS.items() if v in compatible]
        raise InputError(f"{sampler} is not a diffusers scheduler that {source}'s {own.__name__} config fits; "
                         f"choose one of {', '.join(shorts)} or a class among {', '.join(sorted(compatible))}",
                         option="sampler")
    try:
        with _quiet():
            return cls.from_config(pipe.scheduler.config)
    except ImportError as exc:  # DPMSolverSDEScheduler needs torchsde
        raise InputError(f"{name} needs a package that is not installed ({str(exc).strip().splitlines()[0]})",
                         option="sampler") from None


def _set(scheduler, steps: int):
    """A fresh copy of ``scheduler`` set to ``steps``, or None when it refuses that count. Its
    ``timesteps`` are those at which a pipeline calls the UNet, one per call (a Heun-type
    scheduler lists a timestep twice)."""
    with _quiet():
        probe = type(scheduler).from_config(scheduler.config)
        try:
            probe.set_timesteps(steps)
        except ValueError:
            return None
    return probe


def scheduler_steps_for_nfe(scheduler, nfe: int, sampler: str) -> int:
    """The num_inference_steps at which ``scheduler`` calls the UNet exactly ``nfe`` times per
    sample (a pipeline calls it once per timestep, both halves of guidance in one batch); an
    impossible NFE lists the nearest valid."""
    counts = []
    for steps in range(1, nfe + 2):
        probe = _set(scheduler, steps)
        if probe is None:
            continue
        if len(probe.timesteps) == nfe:
            return steps
        counts.append(len(probe.timesteps))
        if len(probe.timesteps) > nfe:
            break
    raise impossible_nfe(sampler, nfe, counts)


def _check_drivable(pipe, scheduler, source: str) -> None:
    """An unconditional pipeline's own loop drives only some schedulers: DDIMPipeline passes eta
    to step (DDIM only); DDPMPipeline passes generator= to step and neither scales the initial
    noise nor the UNet's input."""
    kind, name = type(pipe).__name__, type(scheduler).__name__
    if kind == "DDIMPipeline" and name != "DDIMScheduler":
        raise InputError(f"{source} is a DDIMPipeline, whose own loop steps only DDIMScheduler: use ddim, or a "
                         f"σ-space sampler (heun, euler, dpmpp_2m)", option="sampler")
    if kind != "DDPMPipeline":
        return
    if "generator" not in inspect.signature(scheduler.step).parameters:
        raise InputError(f"{source} is a DDPMPipeline, whose own loop passes generator= to the scheduler's step, "
                         f"which {name} does not take: use ddpm, ddim, dpmsolver or dpmsolver_singlestep, or a "
                         f"σ-space sampler (heun, euler, dpmpp_2m)", option="sampler")
    probe = _set(scheduler, 2)
    x = torch.ones(1, 1, 2, 2)
    if float(probe.init_noise_sigma) != 1.0 or not torch.equal(probe.scale_model_input(x, probe.timesteps[0]), x):
        raise InputError(f"{source} is a DDPMPipeline, whose own loop neither scales the initial noise nor the "
                         f"UNet's input, as {name} needs: use ddpm, ddim, dpmsolver or dpmsolver_singlestep, or a "
                         f"σ-space sampler (heun, euler, dpmpp_2m)", option="sampler")


# --- sampling -----------------------------------------------------------------------------------
class PipelineRun:
    """A pipeline loaded once and set to a scheduler and NFE; ``sample(seeds)`` is its own
    ``__call__`` on those seeds, as uint8 images. ``prompts`` is a text pipeline's prompt file.

    ``sigmas``: the σ of each UNet call of one sample, in order; ``timestep_to_sigma``: σ of a
    timestep the UNet receives, from the pipeline's noise schedule; ``steps``: the
    num_inference_steps that spends exactly ``nfe`` UNet calls."""

    def __init__(self, source: str, sampler: str, nfe: int, prompts: str | os.PathLike | None = None,
                 guidance: float | None = None, height: int | None = None, width: int | None = None,
                 device: torch.device | str = "cpu", autocast: torch.dtype | None = None) -> None:
        from .prompts import read_prompts

        _, index = read_index(source)
        self.kind = pipeline_kind(source, index)
        if self.kind == "text" and prompts is None:
            raise InputError(f"{source} is a text-to-image model: it needs a prompt file (one prompt per line; seed s "
                             f"uses prompt s mod P)", option="prompts")
        if self.kind == "unconditional" and prompts is not None:
            raise InputError(f"{source} takes no text; prompts and guidance are for text-to-image pipelines (Stable "
                             f"Diffusion style)", option="prompts")
        if self.kind == "unconditional" and (height or width):
            raise InputError(f"{source} samples at its UNet's own size; an image size is for text-to-image "
                             f"pipelines", option="height" if height else "width")
        prompts = read_prompts(prompts) if prompts is not None else None
        self.pipe = load_pipeline(source)
        for option, value in (("height", height), ("width", width)):
            if value is not None and value % self.pipe.vae_scale_factor:
                raise InputError(f"{option} {value} is not a multiple of {self.pipe.vae_scale_factor}, the size of "
                                 f"one latent pixel of {source}", option=option)
        self.source, self.prompts, self.guidance = source, prompts, guidance
        self.height, self.width = height, width
        self.device = torch.device(device)
        self.autocast = autocast
        _noise_schedule(source, self.pipe.scheduler)  # the training schedule: σ of every timestep
        to_sigma = timestep_to_sigma_from_scheduler(self.pipe.scheduler)
        scheduler = make_scheduler(self.pipe, sampler, source)
        _check_drivable(self.pipe, scheduler, source)
        self.steps = scheduler_steps_for_nfe(scheduler, nfe, sampler)
        probe = _set(scheduler, self.steps)
        self.sigmas = to_sigma(probe.timesteps).cpu()
        _check_timesteps(probe, self.sigmas, source)
        self.timestep_to_sigma = to_sigma
        self.pipe.scheduler = scheduler
        self.pipe.to(self.device)
        self.info = {"name": source, "pipeline": type(self.pipe).__name__, "scheduler": type(scheduler).__name__,
                     "steps": self.steps}

    def arguments(self, seeds: Sequence[int]) -> dict:
        """The pipeline's own arguments for ``seeds``: one CPU generator per sample, seeded with its
        seed (so a seed gives the same sample in any batch, on any device), the prompt of each seed
        and the guidance scale, the size when one is set, tensor output."""
        from .prompts import prompt_indices

        kwargs = {"num_inference_steps": self.steps, "output_type": "pt",
                  "generator": [torch.Generator().manual_seed(int(seed)) for seed in seeds]}
        if self.kind == "unconditional":
            return {**kwargs, "batch_size": len(seeds)}
        kwargs.update(prompt=[self.prompts[i] for i in prompt_indices(seeds, len(self.prompts))],
                      guidance_scale=self.guidance)
        kwargs.update({k: v for k, v in (("height", self.height), ("width", self.width)) if v is not None})
        return kwargs

    def sample(self, seeds: Sequence[int]) -> torch.Tensor:
        """uint8 images [len(seeds), C, H, W] of the pipeline's own call on ``seeds``."""
        from ..sampling.images import unit_to_uint8

        with _quiet(), torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            images = self.pipe(**self.arguments(seeds)).images
        if not torch.isfinite(images).all():
            raise NonFiniteSamplesError(f"non-finite values in samples of seeds {seeds[0]}..{seeds[-1]}")
        return unit_to_uint8(images)


def _check_timesteps(scheduler, sigmas: torch.Tensor, source: str) -> None:
    """A scheduler (set to its steps) that keeps its own σ per timestep (Euler, Heun, DPM-Solver,
    ...) must agree with ``sigmas``, the σ the controller reads from its timesteps: else it does
    not step on the model's training timesteps (EDM-style schedulers pass ln(σ)/4) and cannot
    sample this model."""
    own = getattr(scheduler, "sigmas", None)
    if own is None or len(own) != len(scheduler.timesteps) + 1:
        return
    gap = (sigmas.double().log() - torch.as_tensor(own[:-1], dtype=torch.float64).log()).abs().max()
    if not gap < 0.05:
        raise InputError(f"{type(scheduler).__name__} does not call the UNet at {source}'s training timesteps (its "
                         f"σ and the σ of its timesteps differ): it cannot sample this model; choose another "
                         f"scheduler", option="sampler")
