"""The `sslam` command line: a thin Typer layer over `sslam_core`."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="sslam",
    help="Audio tagging, embeddings, pre-training and fine-tuning with SSLAM / EAT.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each command module registers itself on `app`.
from sslam_cli import extract as _extract  # noqa: E402
from sslam_cli import tag as _tag  # noqa: E402

app.command("tag")(_tag.tag)
app.command("extract")(_extract.extract)
from sslam_cli import convert as _convert  # noqa: E402

app.command("convert")(_convert.convert)
from sslam_cli import pack as _pack  # noqa: E402

app.command("pack")(_pack.pack)
from sslam_cli import evaluate as _evaluate  # noqa: E402
from sslam_cli import plot as _plot  # noqa: E402
from sslam_cli import stats as _stats  # noqa: E402

app.command("eval")(_evaluate.evaluate)
app.command("stats")(_stats.stats)
app.command("plot")(_plot.plot)
from sslam_cli import pretrain as _pretrain  # noqa: E402

app.command("pretrain")(_pretrain.pretrain)
from sslam_cli import finetune as _finetune  # noqa: E402

app.command("finetune")(_finetune.finetune)
