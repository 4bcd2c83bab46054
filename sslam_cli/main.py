"""The `sslam` command line: a thin Typer layer over `sslam_core`, one module per command."""

from __future__ import annotations

import typer

from sslam_cli import convert, evaluate, extract, finetune, pack, plot, pretrain, stats, tag

app = typer.Typer(
    name="sslam",
    help="Audio tagging, embeddings, pre-training and fine-tuning with SSLAM / EAT.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _setup() -> None:
    """Process-wide settings shared by every command."""
    from sslam_core.inference import limit_heap_fragmentation

    limit_heap_fragmentation()


app.command("tag")(tag.tag)
app.command("extract")(extract.extract)
app.command("convert")(convert.convert)
app.command("pretrain")(pretrain.pretrain)
app.command("finetune")(finetune.finetune)
app.command("eval")(evaluate.evaluate)
app.command("stats")(stats.stats)
app.command("plot")(plot.plot)
app.command("pack")(pack.pack)
