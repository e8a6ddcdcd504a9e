"""skiptune-search's command line: one module per group of commands, composed here.

``tune`` (search), ``eye`` (tune by eye in optuna-dashboard), ``studies`` (studies, export, report, dashboard), ``schedules`` (inspect,
sample, evaluate), ``maintain`` (bench, train-default, model-card, reference-stats); shared
options, errors and config files in ``common``. Every command's help text is its manual, and
``--help`` loads no torch: bodies import what they run.
"""

from __future__ import annotations

import click

from . import eye, maintain, schedules, studies, tune
from .common import UserError


class OneLineErrors(click.Group):
    """A bad option value (out of its range, not a number, not a choice) is one line, as every
    other error of this tool: 'Error: Invalid value for '--nfe': 0 is not in the range 1<=x<=1000.'
    with exit code 2, instead of the usage block first."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            if exc.ctx is None or exc.ctx.command is self:
                raise
            raise UserError(f"{exc.format_message()} (see 'skiptune-search {exc.ctx.info_name} --help')") from None


@click.group(cls=OneLineErrors,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="skiptune-search")
def main() -> None:
    """Automatic Skip-Tuning (Ma et al., ICML 2024): search the ρ that multiplies each long
    skip of a diffusion UNet, scored by proxy FID, persisted in an Optuna study, exported as JSON.

    \b
    Typical day:
      skiptune-search search                      # tune the bundled model (resumable)
      skiptune-search export --study NAME -o best.json
      skiptune-search sample --schedule best.json -n 64 -o grid.png
    """


for module in (tune, eye, studies, schedules, maintain):
    for command in module.COMMANDS:
        main.add_command(command)
