"""For maintainers: the benchmarks, and the bundled model's training, card and statistics."""

from __future__ import annotations

import time
from pathlib import Path

import click

from ..core.limits import MAX_BATCH, MAX_N
from .common import (
    MAX_NFE, Number, UserError, check_outputs, check_threads, friendly, model_source, threads_option, torch_setup,
)


class _ListsTables(click.Command):
    """``bench``'s help lists the built-in tables from ``bench.tables.BUILTIN`` (a new table is
    listed without an edit here)."""

    def format_help_text(self, ctx, formatter) -> None:
        super().format_help_text(ctx, formatter)
        from ..bench.tables import BUILTIN

        with formatter.section("Tables"):
            formatter.write_dl([(str(number), line) for number, (_, line) in sorted(BUILTIN.items())])


@click.command(cls=_ListsTables)
@click.option("--quick", is_flag=True, help="Small sizes that only keep the command working (the test suite runs it).")
@click.option("--out", "out", default=None, type=click.Path(dir_okay=False),
              help="The Markdown file to write (all tables: measured now or earlier under --work) [default: "
                   "BENCHMARKS.md for studies/bench, else WORK/BENCHMARKS.md: --quick and other folders never "
                   "overwrite the committed tables].")
@click.option("--model", default="fashion-mnist-edm", show_default=True,
              help="Model of tables 1-5 and 8 (as --model of search).")
@click.option("--nfe", default=9, show_default=True, type=click.IntRange(1, MAX_NFE),
              help="Heun NFE of tables 1-4 and 6.")
@click.option("--tables", default=None,
              help="Which tables to measure, comma-separated; the others are rendered from earlier runs "
                   "('none': only render) [default: 1-5, and 6 on a GPU].")
@click.option("--work", default=None, type=click.Path(file_okay=False),
              help="Folder of the tables' raw results; long tables resume from it [default: studies/bench, "
                   "studies/bench-quick with --quick].")
@click.option("--truth-n", default=None, type=click.IntRange(2, MAX_N),
              help="Held-out samples per schedule in table 3 [default: 10000; 32 with --quick]. Tables 5 "
                   "and 8 always score 10,000 (32 with --quick).")
@click.option("--threads", default=0, type=click.IntRange(0, 4096), callback=check_threads,
              help="torch CPU threads (0: torch's choice; at most the CPU cores).")
@click.option("--edm-path", default=None, type=click.Path(exists=True, file_okay=False),
              help="Table 7: a checkout of NVlabs/edm, whose code builds EDM's ADM (imported: its code runs).")
@click.option("--edm2-path", default=None, type=click.Path(exists=True, file_okay=False),
              help="Table 7: a checkout of NVlabs/edm2, whose code builds EDM2-img64-S (imported: its code runs).")
@click.option("--uvit-path", default=None, type=click.Path(exists=True, file_okay=False),
              help="Table 7: a checkout of baofff/U-ViT, whose code builds U-ViT-M (imported: its code runs).")
@friendly
def bench(quick, out, model, nfe, tables, work, truth_n, threads, edm_path, edm2_path, uvit_path) -> None:
    """Measure the benchmark tables and write them, each with its machine and command, to
    BENCHMARKS.md. The built-in tables are listed below (a table registered from Python is
    measured and rendered as well).

    Tables 3, 4, 5, 8 and 9 sample the most: their results are saved as they come under --work,
    and rerunning the same command resumes them. One run at a time measures into a --work folder
    (a second is refused); '--tables none' renders beside it.
    """
    from ..bench.run import run_bench
    from ..bench.tables import table_numbers

    torch_setup(threads)
    if tables is None:
        import torch

        tables = "1,2,3,4,5" + (",6" if torch.cuda.is_available() else "")
    try:
        wanted = () if tables == "none" else tuple(sorted({int(t) for t in tables.split(",")}))
    except ValueError:
        raise UserError(f"--tables {tables}: give table numbers separated by commas, e.g. 1,2") from None
    if not set(wanted) <= set(table_numbers()):
        raise UserError(f"--tables {tables}: the tables are {', '.join(map(str, table_numbers()))}")
    folder = Path(work or ("studies/bench-quick" if quick else "studies/bench"))
    # BENCHMARKS.md renders studies/bench; any other folder (--quick's included) renders beside its results
    out = out or ("BENCHMARKS.md" if folder == Path("studies/bench") else str(folder / "BENCHMARKS.md"))
    command = (f"skiptune-search bench{' --quick' if quick else ''} --out {out} --model {model} --nfe {nfe} "
               f"--tables {','.join(map(str, wanted)) or 'none'}" + (f" --work {work}" if work else "")
               + (f" --truth-n {truth_n}" if truth_n else "") + (f" --threads {threads}" if threads else "")
               + "".join(f" --{k}-path {v}" for k, v in (("edm", edm_path), ("edm2", edm2_path), ("uvit", uvit_path))
                         if v and 7 in wanted))
    checkouts = {"edm": edm_path, "edm2": edm2_path, "uvit": uvit_path}
    results = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix != ".md") if folder.is_dir() else []
    # the tables are Markdown (.md); any other file under --work is a result the run writes or reads
    work_results = [] if Path(out).suffix.lower() == ".md" else [("the results folder of --work", folder)]
    check_outputs(out, inputs=[*model_source(model).inputs(), *((f"the {k} checkout", v) for k, v in checkouts.items()),
                               *(("a result of --work", p) for p in results), *work_results])
    click.echo(f"wrote {run_bench(quick, Path(out), folder, model, nfe, command, wanted, truth_n, checkouts)}")


@click.command("train-default")
@click.option("--steps", default=20000, show_default=True, type=click.IntRange(0, 10_000_000),
              help="Total optimizer steps (resume continues to this).")
@click.option("--batch", default=128, show_default=True, type=click.IntRange(1, MAX_BATCH))
@click.option("--lr", default=1e-3, show_default=True, type=Number(0, 1, min_open=True))
@click.option("--out", "out", default=None, type=click.Path(file_okay=False),
              help="Model folder [default: the bundled model's folder].")
@click.option("--state", default="studies/train-state.pt", show_default=True, type=click.Path(dir_okay=False),
              help="Full training state (weights, EMA, optimizer) for an exact resume.")
@click.option("--fresh", is_flag=True, help="Start from random weights instead of resuming.")
@click.option("--data-dir", default=None, type=click.Path(file_okay=False),
              help="Folder with the Fashion-MNIST IDX .gz files.")
@threads_option
@friendly
def train_default(steps, batch, lr, out, state, fresh, data_dir, threads) -> None:
    """Train (or resume training) the bundled Fashion-MNIST model with EDM's loss.

    Saves the EMA weights (safetensors, diffusers layout) every 250 steps, atomically, so it
    can be stopped at any time and resumed by running it again.
    """
    from ..bundled.data import resolve_data_dir
    from ..bundled.training import TrainConfig
    from ..bundled.training import train_default as train
    from ..bundled import DEFAULT_MODEL_DIR

    out_dir = Path(out) if out else DEFAULT_MODEL_DIR
    data = ("the Fashion-MNIST data folder", resolve_data_dir(data_dir))
    if out_dir.is_symlink() or out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out: {out_dir} is not a folder (a link or a file); pass a model folder to write")
    check_outputs(state, inputs=[("the model folder this command rewrites", out_dir), data], option="state")
    torch_setup()
    cfg = TrainConfig(steps=steps, batch=batch, lr=lr, threads=threads)
    info = train(out_dir, Path(state), cfg, data_dir, resume=not fresh)
    loss = f"{info['final_loss']:.4f}" if info.get("final_loss") is not None else "not measured (no step ran)"
    click.echo(f"{info['steps']} steps, {info['images_seen']} images, final loss {loss}, "
               f"{info['wall_seconds'] / 3600:.2f} h")


@click.command("model-card")
@click.option("--model", default="fashion-mnist-edm", show_default=True, help="Model folder to describe.")
@click.option("--nfe", default=35, show_default=True, type=click.IntRange(1, MAX_NFE),
              help="Heun NFE of the card's samples.")
@click.option("-n", "n", default=2000, show_default=True, type=click.IntRange(100, 1_000_000),
              help="Samples for the FID.")
@click.option("--data-dir", default=None, type=click.Path(file_okay=False),
              help="Folder with the Fashion-MNIST IDX .gz files (real-data floor).")
@friendly
def model_card(model, nfe, n, data_dir) -> None:
    """Write MODEL_CARD.md and samples.png into a model folder: training record, FID, floor."""
    from ..bundled.card import write_model_card

    torch_setup()
    click.echo(f"wrote {write_model_card(model, nfe=nfe, n=n, data_dir=data_dir)}")


@click.command("reference-stats")
@click.option("--data-dir", default=None, type=click.Path(file_okay=False),
              help="Folder with the Fashion-MNIST IDX .gz files.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "test"]))
@click.option("-o", "--out", "out", required=True, type=click.Path(dir_okay=False), help=".npz file to write.")
@friendly
def reference_stats(data_dir, split, out) -> None:
    """Compute reference statistics of Fashion-MNIST with EfficientNet-Lite0: mu and sigma of all
    images (FID) and the features of the first 2,000 (KID)."""
    import torch

    from ..bundled.data import load_fashion_mnist, resolve_data_dir
    from ..scoring import DEFAULT_FEATURES
    from ..scoring.metrics import ReferenceStats, extract_features, load_extractor

    check_outputs(out, inputs=[("the Fashion-MNIST data folder", resolve_data_dir(data_dir))])
    torch_setup()
    images, _ = load_fashion_mnist(split, data_dir)
    start = time.perf_counter()
    features = extract_features(torch.from_numpy(images.copy()).unsqueeze(1), load_extractor(), progress=True)
    ReferenceStats.from_features(features, DEFAULT_FEATURES, kid_samples=2000).save(out)
    click.echo(f"wrote {out}: {len(images)} {split} images, {time.perf_counter() - start:.0f}s")


COMMANDS = [bench, train_default, model_card, reference_stats]
