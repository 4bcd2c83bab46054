"""The FSDD split the check scripts share: labels CSVs from metadata.csv's official split column
(recording index 0-4 = test) and the list of training recordings for unlabelled pre-training."""

from __future__ import annotations

import csv
from pathlib import Path


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
