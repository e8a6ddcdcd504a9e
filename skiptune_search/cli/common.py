"""What every command shares: the one-line error, signals, typed options, config files.

Only the CLI parses arguments. Options are typed (``IntRange``, ``FloatRange``, ``Choice``,
``Path``), so command bodies do no range checks; the library raises ``SkiptuneError`` for what
only it can judge, and ``friendly`` turns exactly those (and nothing else: a bug keeps its
traceback) into one line that names the command's flag for the setting.
"""

from __future__ import annotations

import errno
import functools
import math
import signal
import sys

import click

from ..core.families import families_help, family_names
from ..core.limits import GUIDANCE_RANGE, MAX_BATCH, MAX_NFE, MAX_SEED, SIZE_RANGE, usable_cores
from ..core.schedule import PLACEMENTS
from ..sampling import SAMPLER_NAMES, SCHEDULERS, SIGMA_GRIDS, canonical_sampler
from ..scoring import FEATURE_LAYERS, PRECISIONS
from ..search import DEFAULT_STORAGE, interrupts

Seeds = click.IntRange(0, MAX_SEED)


class Number(click.FloatRange):
    """The one type of every float option: a finite number in its range. click's FloatRange
    lets NaN through every bound (each comparison with NaN is false) and infinity through an
    open end; neither means anything for any setting of this tool."""

    name = "number"

    def convert(self, value, param, ctx):
        number = click.types.FloatParamType.convert(self, value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


class UserError(click.ClickException):
    """A one-line error for bad input; exit code 2."""

    exit_code = 2


# what an interrupted command kept, by command
_RESUME_HINTS = {"search": ": every finished trial is saved; rerun the same command to resume",
                 "eye": ": every choice is saved in the study; rerun the same command to go on, or export it",
                 "bench": ": every finished point is saved under --work; rerun the same command to resume",
                 "train_default": ": rerun the same command to resume from the last saved state (--state)"}


def _flag(ctx: click.Context | None, option: str | None) -> str | None:
    """The command's flag for a library setting ('nfe' -> '--nfe'), where it has one."""
    if ctx is None or option is None:
        return None
    for param in ctx.command.params:
        if param.name == option and isinstance(param, click.Option):
            return max(param.opts, key=len)
    return None


def friendly(fn):
    """Turn the tool's own errors (``SkiptuneError``) into one line naming the problem, the flag
    and the fix, exit 2; Ctrl-C and SIGTERM (``search.interrupts``: a search stops cleanly
    between or inside trials) into a line saying what was kept, exit 130 or 143. Anything else is
    a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ..core.errors import SkiptuneError

        interrupts.install()
        try:
            return fn(*args, **kwargs)
        except SkiptuneError as exc:
            flag = _flag(click.get_current_context(silent=True), exc.option)
            raise UserError(f"{flag}: {exc}" if flag else str(exc)) from None
        except KeyboardInterrupt:
            terminated = interrupts.state.signum == signal.SIGTERM
            click.echo(f"\n{'terminated' if terminated else 'interrupted'}{_RESUME_HINTS.get(fn.__name__, '')}",
                       err=True)
            sys.exit(143 if terminated else 130)
        except OSError as exc:
            if (line := _fs_fault(click.get_current_context(silent=True), exc)) is None:
                raise
            raise UserError(line) from None
        except Exception as exc:
            torch = sys.modules.get("torch")
            if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
                raise UserError("out of GPU memory: pass a smaller --batch (a text-to-image model doubles it for "
                                "guidance)") from None
            if is_cpu_out_of_memory(exc):
                raise UserError(f"out of memory (CPU): {memory_hint(click.get_current_context(silent=True))}") from None
            raise

    return wrapper


# what torch says when a CPU allocation fails (c10/core/impl/alloc_cpu.cpp; C++ new in its bindings)
_CPU_ALLOC_FAILURES = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory",
                       "std::bad_alloc")


def is_cpu_out_of_memory(exc: BaseException) -> bool:
    """Python's MemoryError, or torch's CPU allocator failing (a RuntimeError naming it)."""
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError)
                                            and any(m in str(exc) for m in _CPU_ALLOC_FAILURES))


def memory_hint(ctx: click.Context | None) -> str:
    """What to lower when memory runs out: the command's batch, sample count and image size."""
    flags = [f for f in (_flag(ctx, o) for o in ("batch", "n", "height", "width")) if f]
    if not flags:
        return "close other programs or use a machine with more memory"
    return f"pass a smaller {flags[0]}" + (f" (or a smaller {', '.join(flags[1:])})" if flags[1:] else "")


# file-system faults that no code of ours causes, with what to do; any other OSError is a bug
_FS_FAULTS = {errno.ENAMETOOLONG: "give a shorter path", errno.ELOOP: "give the real path, not a loop of links",
              errno.EROFS: "give a path on a writable file system",
              errno.ENOSPC: "free space and run the same command again",
              errno.EDQUOT: "free space (or raise the quota) and run the same command again"}


def _fs_fault(ctx: click.Context | None, exc: OSError, flag: str | None = None) -> str | None:
    """One line for a file-system fault (a name too long, a read-only file system, a full disk)
    met reading or writing a path, naming ``flag`` or the command's flag whose path it is; None
    for any other error."""
    if exc.errno not in _FS_FAULTS:
        return None
    name = str(exc.filename or "")
    if flag is None and ctx is not None and name:
        for param in ctx.command.params:
            value = ctx.params.get(param.name)
            if isinstance(param, click.Option) and isinstance(value, str) and value and (
                    name == value or name.startswith(value.rstrip("/") + "/")):
                flag = max(param.opts, key=len)
    shown = name if len(name) <= 80 else f"{name[:40]}…{name[-30:]}"
    where = f"{shown}: " if shown else ""
    return f"{flag + ': ' if flag else ''}{where}{exc.strerror}; {_FS_FAULTS[exc.errno]}"


def torch_setup(threads: int = 0) -> None:
    """Set torch's CPU threads (0: its default) and flush denormal floats to zero: a UNet's
    activations at large σ make many, ~30x slower on x86 CPUs; flushing left every uint8 sample of
    the bundled model unchanged. Called by the commands that run a model, not by --help."""
    import torch

    torch.set_flush_denormal(True)
    if threads:
        torch.set_num_threads(threads)


# --- options ------------------------------------------------------------------------------------
def check_threads(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    """--threads at most the CPU cores there are: more only makes torch's threads wait for each
    other (and thousands of them exhaust the process limit)."""
    cores = usable_cores()
    if value is not None and value > cores:
        raise click.BadParameter(f"{value} threads, but this process may use {cores} CPU core(s): use at most "
                                 f"{cores} (0: torch's default)", ctx, param)
    return value


def threads_option(fn):
    return click.option("--threads", default=0, type=click.IntRange(0, 4096), callback=check_threads,
                        help="CPU threads for torch (0: torch's default; at most the CPU cores).")(fn)


def device_option(fn):
    return click.option("--device", default="auto", show_default=True,
                        help="'auto' (a CUDA GPU when torch sees one, else the CPU), 'cpu', 'cuda' or 'cuda:N'.")(fn)


def batch_option(fn):
    return click.option("--batch", default=250, show_default=True, type=click.IntRange(1, MAX_BATCH),
                        help="Sampling and feature batch size.")(fn)


def storage_option(fn):
    return click.option("--storage", default=DEFAULT_STORAGE, show_default=True,
                        help="Optuna storage: any SQLAlchemy URL (sqlite:///..., postgresql://...).")(fn)


class Checkout(click.ParamType):
    """NAME=PATH: a code base a registered model kind may run (``models.source.known_checkouts``),
    and its folder."""

    name = "name=path"

    def convert(self, value, param, ctx):
        from ..models.source import known_checkouts

        name, _, path = value.partition("=")
        if not name or not path:
            self.fail(f"{value!r} is not NAME=PATH: give the code base's name and its folder, e.g. edm=/src/edm",
                      param, ctx)
        known = known_checkouts()
        if name not in known:
            self.fail(f"{name!r} is not a checkout a model kind runs: name one of {', '.join(known)}", param, ctx)
        return name, click.Path(file_okay=False).convert(path, param, ctx)


SHORTCUTS = {"edm_path": "edm", "uvit_path": "uvit"}  # --edm-path X is --checkout edm=X


def model_options(command):
    """--model, --trust-pickle, --checkout (and its shortcuts --edm-path, --uvit-path),
    --uvit-config: which model, and consent to run a pickle's or a checkout's code (command line
    only: a config file cannot give it). The command gets the checkouts as one ``checkouts``
    mapping, name -> folder, for ``model_source``."""

    @functools.wraps(command)
    def with_checkouts(*args, checkout, **options):
        given = [(name, path, f"--checkout {name}={path}") for name, path in checkout]
        for option, name in SHORTCUTS.items():
            if (path := options.pop(option)) is not None:
                given.insert(0, (name, path, f"--{option.replace('_', '-')} {path}"))
        checkouts, shown = {}, {}
        for name, path, flag in given:
            if checkouts.setdefault(name, path) != path:
                raise UserError(f"two checkouts of {name}: {shown[name]} and {flag}; give one")
            shown.setdefault(name, flag)
        return command(*args, checkouts=checkouts, **options)

    fn = click.option("--uvit-config", default=None,
                      help="Name of a U-ViT checkpoint's config in the checkout's configs/ (e.g. cifar10_uvit_small) "
                           "[default: the checkpoint's file name].")(with_checkouts)
    fn = click.option("--checkout", multiple=True, type=Checkout(),
                      help="A checkout of the code a model kind needs, as NAME=PATH (repeatable): edm (NVlabs/edm or "
                           "edm2), uvit (baofff/U-ViT), or a name a registered kind declares. Loading the model runs "
                           "that checkout's code.")(fn)
    fn = click.option("--uvit-path", default=None, type=click.Path(file_okay=False),
                      help="Checkout of baofff/U-ViT, needed to build a U-ViT .pth checkpoint's network (runs the "
                           "checkout's libs/uvit.py and config); the same as --checkout uvit=PATH.")(fn)
    fn = click.option("--edm-path", default=None, type=click.Path(file_okay=False),
                      help="Checkout of NVlabs/edm (NVlabs/edm2 for EDM2 networks), needed to unpickle them; "
                           "the same as --checkout edm=PATH.")(fn)
    fn = click.option("--trust-pickle", is_flag=True,
                      help="Allow loading an EDM or EDM2 .pkl (unpickling runs code from the file).")(fn)
    fn = click.option("--model", default="fashion-mnist-edm", show_default=True,
                      help="'fashion-mnist-edm' (bundled), a model folder written by train-default, a "
                           "diffusers pipeline: Stable Diffusion 1.x/2.x, SDXL, DDPM or DDIM (folder, or repo id "
                           "in the local cache), an EDM or EDM2 network pickle (.pkl, with --trust-pickle), or a "
                           "U-ViT state dict (.pth, with --uvit-path).")(fn)
    return fn


def grid_option(fn, default_help: str = "karras; model for diffusers schedulers, which step on their own"):
    return click.option("--sigma-grid", default=None, type=click.Choice(SIGMA_GRIDS),
                        help="σ steps of heun/euler/dpmpp_2m: karras (Karras et al. ρ = 7, σ_max to σ_min) or "
                             "model (the model's own training timesteps, evenly spaced, rounded; unconditional "
                             f"diffusers pipelines only). [default: {default_help}]")(fn)


def text_options(fn, default: str = "none; required for text-to-image models",
                 guidance_default: str = "7.5 with --prompts"):
    fn = click.option("--guidance", default=None, type=Number(*GUIDANCE_RANGE),
                      help="Classifier-free guidance scale of a text-to-image pipeline (its guidance_scale): "
                           "uncond + G*(cond - uncond) in one batched UNet call; 1 = no guidance (one call). "
                           f"[default: {guidance_default}]")(fn)
    fn = click.option("--prompts", default=None, type=click.Path(dir_okay=False),
                      help="Prompt file of a text-to-image model (Stable Diffusion style): one prompt per line, "
                           f"blank lines ignored; the sample of seed s uses prompt s mod P. [default: {default}]")(fn)
    return fn


def size_options(fn, default: str = "the pipeline's own (SD: 512 or 768, SDXL: 1024)"):
    """--height, --width: a text-to-image pipeline's image size."""
    for name in ("width", "height"):
        fn = click.option(f"--{name}", default=None, type=click.IntRange(*SIZE_RANGE),
                          help=f"Image {name} in pixels of a text-to-image pipeline (its {name} argument; SDXL "
                               f"builds its size micro-conditioning from it), a multiple of its VAE's scale factor (8 "
                               f"for SD and SDXL). "
                               f"[default: {default}]")(fn)
    return fn


def precision_option(fn, default: str | None = "fp32"):
    return click.option("--precision", default=default, show_default=default is not None,
                        type=click.Choice(list(PRECISIONS)),
                        help="Precision of the model's forward: fp32, or bf16 autocast (convolutions and matmuls "
                             "in bf16; the sampler's steps and the FID stay fp32). bf16 pays off on GPUs with bf16 "
                             "tensor cores, rarely on CPUs; a schedule is tuned for one precision."
                             + ("" if default else " [default: the schedule's]"))(fn)


class SamplerName(click.ParamType):
    """A sampler's short name, or a diffusers scheduler class name (checked against the pipeline
    when it loads)."""

    name = "sampler"

    def convert(self, value, param, ctx):
        sampler = canonical_sampler(value) if isinstance(value, str) else None
        if sampler is None:
            self.fail(f"{value!r} is not one of {', '.join(SAMPLER_NAMES)}, nor a diffusers scheduler class name "
                      f"(e.g. KDPM2AncestralDiscreteScheduler)", param, ctx)
        return sampler


def sampler_option(fn, default_help: str = "heun; a text-to-image pipeline's own scheduler"):
    return click.option("--sampler", default=None, type=SamplerName(),
                        help="heun, euler, dpmpp_2m: ODE samplers in σ space on --sigma-grid (EDM's Heun: NFE = "
                             "2*steps-1; Euler, DPM-Solver++(2M): NFE = steps), for the bundled model, EDM networks "
                             "and unconditional diffusers pipelines. Any other name is a diffusers scheduler (short "
                             f"name: {', '.join(SCHEDULERS)}; or a class name) with which a diffusers pipeline "
                             f"samples itself, at exactly --nfe UNet calls. [default: {default_help}]")(fn)


def nfe_option(fn, default: int | None = 9):
    return click.option("--nfe", default=default, show_default=default is not None,
                        type=click.IntRange(1, MAX_NFE),
                        help="Denoiser (UNet) evaluations per sample (Heun: 2*steps-1, so odd; guidance batches "
                             "both halves in one)."
                             + ("" if default else " [default: the schedule's]"))(fn)


def task_options(fn):
    """--model, --sampler, --nfe, --seed and the rest: the same on every command that samples."""
    fn = click.option("--seed", default=0, show_default=True, type=Seeds,
                      help="First seed; sample i uses seed SEED+i (same noise in every trial).")(fn)
    fn = nfe_option(sampler_option(fn))
    fn = precision_option(size_options(text_options(grid_option(fn))))
    fn = model_options(fn)
    return device_option(threads_option(fn))


def features_option(fn, default: str | None = "efficientnet-lite0"):
    fn = click.option("--inception-weights", default=None, type=click.Path(dir_okay=False),
                      help="Local Inception-v3 weights (torch-fidelity's .pth), for machines without internet.")(fn)
    return click.option("--features", default=default, show_default=default is not None,
                        type=click.Choice(list(FEATURE_LAYERS)),
                        help="FID feature extractor: EfficientNet-Lite0 (offline) or the standard Inception-v3."
                             + ("" if default else " [default: the schedule's]"))(fn)


def family_options(fn):
    fn = click.option("--family", default="linear", show_default=True, type=click.Choice(family_names()),
                      help=families_help())(fn)
    return click.option("--placement", default="input", show_default=True, type=click.Choice([*PLACEMENTS, "search"]),
                        help="Where ρ acts: input (the skip before its block, as in the paper), normalized (the "
                             "skip channels after the block's GroupNorm, which cannot cancel it), both, or search. "
                             "EDM2 and U-ViT have no normalization there: input only."
                        )(fn)


# --- config files -------------------------------------------------------------------------------
def _load_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--config FILE: the file's values, checked against each option's type, become this
    command's defaults (the command line wins)."""
    if value is None:
        return None
    from .config import ConfigError, check_value, read_config

    params = {p.name: p for p in ctx.command.params if p.name not in ("config", "help")}
    try:
        values = {k: check_value(value, k, v, params[k], ctx) for k, v in read_config(value, params).items()}
    except ConfigError as exc:
        raise UserError(f"--config: {exc}") from None
    except OSError as exc:
        if (line := _fs_fault(ctx, exc, flag="--config")) is None:
            raise
        raise UserError(line) from None
    ctx.default_map = {**(ctx.default_map or {}), **values}
    ctx.meta[CONFIG_READ] = value
    return value


CONFIG_READ = "skiptune_search.config"  # ctx.meta key: the --config file this run read


def config_read() -> str | None:
    """The --config file this run read, if any."""
    ctx = click.get_current_context(silent=True)
    return ctx.meta.get(CONFIG_READ) if ctx else None


def model_source(model: str | None, trust_pickle: bool = False, checkouts=None, uvit_config: str | None = None):
    """The one ``ModelSource`` of a command's model options (``model_options``)."""
    from ..models.source import ModelSource

    return ModelSource(model, trust_pickle, checkouts or {}, uvit_config)


def check_outputs(*outputs, inputs=(), storage: str | None = None, option: str = "out") -> None:
    """Each output path (None: none) is none of the run's own files (``core.files.check_output``):
    not the storage, the --config file read, nor any of ``inputs``; called before any work."""
    from ..core.files import check_output
    from ..search.storage import run_files

    read = [*inputs, ("the config file", config_read()), *run_files(storage)]
    for out in outputs:
        if out is not None:
            check_output(out, read, option=option)


def config_option(fn):
    return click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
                        callback=_load_config,
                        help="TOML file of option values (keys as the long options, e.g. nfe = 19); the command "
                             "line wins. --trust-pickle, --checkout, --edm-path and --uvit-path are command-line "
                             "only.")(fn)


def freeu_lines(schedule, prefix: str = "") -> list[str]:
    """What a schedule's FreeU part does, and diffusers' equivalent call where there is one."""
    f = schedule.freeu
    if f is None:
        return []
    where = "at every σ" if f.window is None else f"while σ is in [{f.window[0]:.4g}, {f.window[1]:.4g}]"
    variant = "" if f.variant == "v1-stages" else f" (FreeU {f.variant})"
    lines = [f"{prefix}FreeU: b1={f.b1:.3f} b2={f.b2:.3f} s1={f.s1:.3f} s2={f.s2:.3f} {where}{variant}"]
    call = schedule.enable_freeu_call()
    if call is not None:
        rho_one = all(r == 1.0 for row in schedule.rho for r in row)
        lines.append(f"diffusers: {call}" + ("" if rho_one else "  (FreeU only; its ρ needs skiptune_search.apply)"))
    elif schedule.arch == "UNet2DConditionModel":  # a pipeline whose user will look for that line
        lines.append(f"diffusers: no pipe.enable_freeu equivalent ({schedule.why_no_enable_freeu()}); sample with "
                     f"skiptune_search.apply")
    return lines


def parse_rungs(text: str | None, n: int) -> tuple[int, ...]:
    """'250,1000' -> (250, 1000); none given -> (N/8, N), or just (N) when N/8 < 2."""
    if not text:
        from ..scoring.task import default_rungs

        return default_rungs(n)
    try:
        return tuple(int(r) for r in text.split(","))
    except ValueError:
        raise UserError(f"--rungs {text!r} is not a comma-separated list of sample counts, e.g. 250,1000") from None


def refuse_trust_for(model: str, named_by: str, trust_pickle: bool) -> None:
    """--trust-pickle covers only the model the command line or --config names: a model that a file
    named (a schedule's tuned_for, a study's settings) is never unpickled, however it is given."""
    if trust_pickle:
        raise UserError(f"--trust-pickle: the model {model} is named by {named_by}, not by you, and trust applies "
                        f"only to a model named on the command line or in --config: pass --model {model} explicitly "
                        f"to trust it")


def tuned_for_defaults(schedule, *, trust_pickle: bool = False, **given) -> dict:
    """The task settings of a command that applies ``schedule``: each one the command line (or
    --config) leaves unset is what the schedule was tuned for; its σ grid only with its sampler;
    the model's own sampler (``Task``: heun, or a text-to-image pipeline's scheduler), NFE 9 and
    fp32 for a hand-written schedule that names none. A model taken from the schedule is refused
    with ``trust_pickle`` (``refuse_trust_for``)."""
    tuned, source = schedule.tuned_for, click.get_current_context().get_parameter_source
    if "model" in given and "model" in tuned and source("model") == click.core.ParameterSource.DEFAULT:
        refuse_trust_for(tuned["model"], "the schedule file", trust_pickle)
    v = {name: tuned[name] if name in tuned and source(name) == click.core.ParameterSource.DEFAULT else value
         for name, value in given.items()}
    same_sampler = v["sampler"] == tuned.get("sampler")  # another sampler keeps its own default grid
    v["sigma_grid"] = given["sigma_grid"] or (tuned.get("sigma_grid") if same_sampler else None)
    v["nfe"], v["precision"] = v["nfe"] or 9, v["precision"] or "fp32"  # a sampler of None: the model's own
    return v
