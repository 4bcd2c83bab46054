"""Does search find what it should? Same-digit retrieval on FSDD with a pre-trained and a random encoder.

    python scripts/search_check.py DATA_ROOT [--work runs/lc]

The two tiny encoders of the learning check (`learning_check.pretrain`: EAT stage 1 on the FSDD training
recordings, 4800 updates, and the same model at random init; finished runs in --work are reused) each
extract the clip vectors of the FSDD test recordings (`sslam extract`, 0.64 s windows as in the check's
probes); every test clip then queries the store through `sslam_core.search.index.Index`, leaving itself
out, and precision@10 is the share of its 10 nearest clips that say the same digit (chance: 0.1; also
reported: the share of queries whose first match is of the same digit, and the same-speaker share).
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path

import numpy as np

from experiments.cli import sslam
from experiments.fsdd import write_fsdd_split
from experiments.learning_check import parser as learning_parser
from experiments.learning_check import pretrain
from sslam_core.search.index import Index


def retrieval(store: Path, digits: dict[str, str], speakers: dict[str, str]) -> dict:
    """Leave-one-out precision@10 of same-digit retrieval over a clip store."""
    with Index(store, "clip", approximate=False) as index:
        names = index.store.paths
        matches = index.search(index.store.vectors(), k=11)
    p10, top1, speaker = [], [], []
    for name, found in zip(names, matches, strict=True):
        others = [m.path for m in found if m.path != name][:10]
        same = [digits[Path(o).name] == digits[Path(name).name] for o in others]
        p10.append(np.mean(same))
        top1.append(same[0])
        speaker.append(np.mean([speakers[Path(o).name] == speakers[Path(name).name] for o in others]))
    return {"clips": len(names), "precision_at_10": round(float(np.mean(p10)), 4),
            "top1_same_digit": round(float(np.mean(top1)), 4),
            "same_speaker_at_10": round(float(np.mean(speaker)), 4)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_root", type=Path)
    p.add_argument("--work", type=Path, default=None)
    args, rest = p.parse_known_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="sslam-search-"))
    check = learning_parser().parse_args([str(args.data_root), "--work", str(work), *rest])
    splits = write_fsdd_split(args.data_root, work)
    pretrain(work / "random", splits["audio"], "eat", 0, check)
    pretrain(work / "eat", splits["audio"], "eat", check.steps, check)
    rows = list(csv.DictReader(open(args.data_root / "fsdd" / "metadata.csv")))
    digits = {r["filename"]: r["digit"] for r in rows}
    speakers = {r["filename"]: r["speaker"] for r in rows}
    test_list = work / "fsdd_test_audio.txt"
    recordings = args.data_root.resolve() / "fsdd" / "recordings"
    test_list.write_text("".join(f"{recordings / r['filename']}\n" for r in rows if r["split"] == "test"))
    report = {"chance_precision_at_10": 0.1}
    for name in ("random", "eat"):
        store = work / f"search_{name}.h5"
        sslam("extract", str(test_list), "-o", str(store), "-c", str(work / name), "--target-length",
              str(check.target_length), "--device", "cpu", "--overwrite", "-w", "0")  # fmt: skip
        report[name] = retrieval(store, digits, speakers)
    report["eat_minus_random_precision_at_10"] = round(
        report["eat"]["precision_at_10"] - report["random"]["precision_at_10"], 4
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
