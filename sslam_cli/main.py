"""The `sslam` command line: a thin Typer layer over `sslam_core`, one module per command.

Help is rendered by click's plain formatter (`rich_markup_mode=None`): help strings are plain text,
so `[default: ...]` and other brackets print as written instead of being read as Rich markup.
"""

from __future__ import annotations

import shutil
from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup

from sslam_cli import (
    convert,
    evaluate,
    export,
    extract,
    finetune,
    pack,
    plot,
    pretrain,
    search,
    stats,
    tag,
    weights,
)
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
        except Exception as e:  # click's usage errors (a bad option value, a missing argument): one line
            if not isinstance(e, usage_error(ctx)):
                raise
            print_error(usage_line(e))
            ctx.exit(e.exit_code)

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except Exception as e:
            if not isinstance(e, usage_error(ctx)):
                raise
            print_error(usage_line(e))
            ctx.exit(e.exit_code)


class SslamCommand(TyperCommand):
    """A `sslam` command: its usage line names a required argument as click does (`PATHS...`), not
    in Typer's braces (`{PATHS}...`), which read like a placeholder left unfilled."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = super().collect_usage_pieces(ctx)
        return [p[1:].replace("}", "", 1) if p.startswith("{") else p for p in pieces]


def usage_error(ctx) -> type:
    """click's UsageError (Typer may bundle its own copy of click: the one `ctx` comes from)."""
    import importlib

    return importlib.import_module(type(ctx).__module__.rsplit(".", 1)[0] + ".exceptions").UsageError


def usage_line(e) -> str:
    """A usage error as one line, with where to read more: the message and `sslam COMMAND --help`."""
    path = e.ctx.command_path if getattr(e, "ctx", None) is not None else "sslam"
    return f"{e.format_message()} (see {path} --help)"


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


# One-line summaries for `sslam --help` (click would cut the docstrings' first lines with "...").
COMMANDS = [
    ("tag", tag.tag, "AudioSet (or custom) tags of audio files, and sound events with --events."),
    ("extract", extract.extract, "Embeddings (clip, frame, patch) of any layer to one HDF5 file."),
    ("convert", convert.convert, "Convert a checkpoint between the fairseq, Hugging Face and sslam layouts."),
    ("export", export.export, "Export a checkpoint to ONNX (fp32 or int8) for CPU deployment."),
    ("pretrain", pretrain.pretrain, "Pre-train an EAT (stage 1) or SSLAM (stage 2) encoder."),
    ("finetune", finetune.finetune, "Fine-tune or linear-probe a classifier on a labelled set."),
    ("eval", evaluate.evaluate, "Evaluate a classifier: mAP, d', accuracy; events with --strong."),
    ("search", search.search, "The nearest clips or segments of an embedding store (query by example)."),
    ("stats", stats.stats, "The fbank mean and std of a data set (for --norm MEAN,STD)."),
    ("weights", weights.weights, "Per-clip sampling weights of a labelled set (for finetune --weights)."),
    ("plot", plot.plot, "Plot the training curves of a run folder."),
    ("pack", pack.pack, "Pack audio into HDF5 shards for pre-training."),
]
for name, command, summary in COMMANDS:
    app.command(name, short_help=summary, cls=SslamCommand)(command)


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
