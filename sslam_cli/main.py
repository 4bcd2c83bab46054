"""The `sslam` command line: a thin Typer layer over `sslam_core`, one module per command.

Help is rendered by click's plain formatter (`rich_markup_mode=None`): help strings are plain text,
so `[default: ...]` and other brackets print as written instead of being read as Rich markup.
"""

from __future__ import annotations

import shutil
from typing import Annotated

import typer
from typer.core import TyperGroup

from sslam_cli import convert, evaluate, export, extract, finetune, pack, plot, pretrain, stats, tag
from sslam_cli.options import print_error
from sslam_core.errors import SslamError

PIPED_HELP_WIDTH = 100


def help_width() -> int:
    """Columns for help: COLUMNS when set, else the terminal's width, else (piped) 100."""
    return shutil.get_terminal_size(fallback=(PIPED_HELP_WIDTH, 24)).columns


class SslamGroup(TyperGroup):
    """The `sslam` group: the one place where a library error (`SslamError`) becomes its one-line
    message on stderr and exit status 2, for every command."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SslamError as e:
            print_error(str(e))
            ctx.exit(e.exit_code)


app = typer.Typer(
    cls=SslamGroup,
    name="sslam",
    help="Audio tagging, embeddings, pre-training and fine-tuning with SSLAM / EAT.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"terminal_width": help_width(), "max_content_width": help_width()},
)


def _print_version(value: bool) -> None:
    if value:
        from sslam_core import __version__

        typer.echo(f"sslam {__version__}")
        raise typer.Exit()


@app.callback()
def _setup(
    version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=_print_version, help="Print the version and exit."),
    ] = False,
) -> None:
    """Process-wide settings shared by every command: the heap setting, and decoder libraries' chatter
    kept off stderr (see `sslam_core.audio.native_stderr`)."""
    from sslam_core.audio.native_stderr import filter_native_stderr
    from sslam_core.runs.process import limit_heap_fragmentation

    limit_heap_fragmentation()
    filter_native_stderr()


app.command("tag")(tag.tag)
app.command("extract")(extract.extract)
app.command("convert")(convert.convert)
app.command("export")(export.export)
app.command("pretrain")(pretrain.pretrain)
app.command("finetune")(finetune.finetune)
app.command("eval")(evaluate.evaluate)
app.command("stats")(stats.stats)
app.command("plot")(plot.plot)
app.command("pack")(pack.pack)


def main() -> None:
    """The `sslam` entry point: the app, with a last safety net. Every expected failure is already one
    line; an unexpected exception (a bug) is one line too, naming the exception, with the traceback
    only when SSLAM_TRACEBACK=1. Finished work is safe either way: outputs are journaled or renamed
    into place, as for a killed process."""
    import os
    import sys

    try:
        app(prog_name="sslam")
    except Exception as e:  # the safety net described above
        if os.environ.get("SSLAM_TRACEBACK") == "1":
            raise
        reason = (str(e).splitlines() or [""])[0]
        hint = "please report it; SSLAM_TRACEBACK=1 shows where"
        print(f"error: unexpected {type(e).__name__}: {reason} ({hint})", file=sys.stderr)
        sys.exit(2)
