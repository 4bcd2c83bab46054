"""The data the checks share: FSDD's official split (labels CSVs from metadata.csv's split column,
recording index 0-4 = test; the training recordings for unlabelled pre-training) and the labelled
FSDD and polydigits train / test sets."""

from __future__ import annotations

import csv
from pathlib import Path

from sslam_core.data.datasets import LabelledSet, read_labelled


def write_fsdd_split(data_root: Path, work: Path) -> dict[str, Path]:
    """Write work/fsdd_{train,test}.csv (`filename,labels`, absolute paths) and work/fsdd_train_audio.txt."""
    rows = list(csv.DictReader(open(data_root / "fsdd" / "metadata.csv")))
    recordings = data_root.resolve() / "fsdd" / "recordings"  # lists resolve paths from their folder
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for split in ("train", "test"):
        path = work / f"fsdd_{split}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["filename", "labels"])
            chosen = [r for r in rows if r["split"] == split]
            writer.writerows([str(recordings / r["filename"]), r["digit"]] for r in chosen)
        out[split] = path
    out["audio"] = work / "fsdd_train_audio.txt"
    out["audio"].write_text("".join(f"{recordings / r['filename']}\n" for r in rows if r["split"] == "train"))
    return out


def fsdd_sets(paths: dict[str, Path]) -> tuple[LabelledSet, LabelledSet]:
    """FSDD train/test LabelledSets (official split) from `write_fsdd_split`'s files."""
    train = read_labelled(paths["train"])
    return train, read_labelled(paths["test"], classes=train, multilabel=False)


def polydigit_sets(root: Path) -> tuple[LabelledSet, LabelledSet]:
    """polydigits train/test LabelledSets (multi-label; the test speakers are not in train)."""
    train = read_labelled(root / "polydigits" / "train")
    return train, read_labelled(root / "polydigits" / "test", classes=train, multilabel=True)
