"""`sslam weights`: the per-clip sampling weights of a labelled set, for `sslam finetune --weights`.

The formula is that of the AudioSet weight files the official AS-2M fine-tuning draws from
(`sslam_core.data.augment.sample_weights`): a clip's weight is the sum over its labels of
1000 / (clips carrying the label + 0.01), so clips of rare classes are drawn more often.
"""

from __future__ import annotations

import csv
import io
from typing import Annotated

import typer

from sslam_cli.options import claim_or_fail, fail, note, write_text_atomic


def weights(
    data: Annotated[
        str, typer.Argument(metavar="DATA", help="A labelled set: labels CSV, folder, AudioSet segments CSV.")
    ],
    output: Annotated[str, typer.Option("--output", "-o", help="The weight file to write (CSV).")],
    audio_dir: Annotated[
        str, typer.Option("--audio-dir", help="Audio folder for formats that keep it elsewhere.")
    ] = None,
    classes: Annotated[
        str, typer.Option("--classes", help="Class list (index,mid,display_name CSV, or one name per line).")
    ] = None,
    plain: Annotated[
        bool,
        typer.Option(
            "--plain",
            help="One weight per line in the set's order (the official file's form) [off: PATH,WEIGHT].",
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing file [off: refuse].")
    ] = False,
) -> None:
    """Write each clip's sampling weight (the official AS-2M formula) for `finetune --weights`."""
    from sslam_core.data.augment import sample_weights
    from sslam_core.data.datasets import read_labelled
    from sslam_core.data.labels import read_label_csv

    claim_or_fail(output, overwrite)
    class_list = read_label_csv(classes) if classes else None
    data_set = read_labelled(data, audio_dir, classes=class_list, multilabel=True)
    if not data_set.examples:
        fail(f"{data}: no clips with audio to weigh")
    values = sample_weights(data_set.targets())
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if not plain:
        writer.writerow(["path", "weight"])
    for example, value in zip(data_set.examples, values, strict=True):
        writer.writerow([f"{value:.9g}"] if plain else [example.path, f"{value:.9g}"])
    write_text_atomic(output, buffer.getvalue())
    unlabelled = int((values == 0).sum())
    note(
        f"wrote {len(values)} weight(s) for {len(data_set.classes)} classes to {output}"
        + (f"; {unlabelled} clip(s) without labels weigh 0 and are never drawn" if unlabelled else "")
    )
