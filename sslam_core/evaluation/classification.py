"""Evaluate a classifier on a labelled set: predictions, class matching, reports and prediction files.

The model runs through `sslam_core.inference.tagging.tag`, the same windowed, batched pipeline as `sslam tag`
and `sslam extract`, so a clip's score is the maximum over its windows. Predictions are kept as a
(clips x dataset classes) score matrix beside the multi-hot targets; every report is computed from
that matrix, so a saved predictions file re-scores exactly without the model.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sslam_core.audio.constants import SAMPLE_RATE
from sslam_core.audio.decode import load_audio
from sslam_core.audio.files import AudioError
from sslam_core.data.datasets import LabelledSet
from sslam_core.errors import SslamError
from sslam_core.evaluation.metrics import (
    average_precision,
    multiclass_report,
    multilabel_report,
    polyphony_report,
    roc_auc,
)
from sslam_core.inference.options import PipelineOptions, pipeline_options
from sslam_core.inference.partition import my_share
from sslam_core.inference.tagging import tag
from sslam_core.runs import distributed
from sslam_core.runs.outputs import atomic_write

PREDICTION_SUFFIXES = (".npz", ".h5", ".hdf5")


class EvaluationError(SslamError, ValueError):
    """Predictions or class lists that cannot be evaluated; the message names the file and the reason."""


@dataclass
class Predictions:
    """Clip scores (N, C) and multi-hot targets (N, C) over the dataset's classes (id, name)."""

    paths: list[str]
    scores: np.ndarray
    targets: np.ndarray
    classes: list[tuple[str, str]]
    multilabel: bool
    skipped: list[str] = field(default_factory=list)  # one message per file left out
    missing: list[str] = field(default_factory=list)  # clips listed in the labels but without audio
    complete: bool = True  # False when a stop request (on any torchrun rank) cut the run short

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(len(self.paths), len(self.classes))
        self.targets = np.asarray(self.targets, dtype=np.float32).reshape(self.scores.shape)

    def save(self, path: str | os.PathLike) -> None:
        """Write an .npz or .h5/.hdf5 file atomically (`outputs.atomic_write`); an OSError while writing
        is an `OutputError` naming the path and the cause."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in PREDICTION_SUFFIXES:
            raise EvaluationError(f"{path}: predictions are saved as .npz, .h5 or .hdf5")
        text = {
            "paths": list(self.paths),
            "class_ids": [c for c, _ in self.classes],
            "class_names": [n for _, n in self.classes],
            "skipped": list(self.skipped),
            "missing": list(self.missing),
        }

        def write_npz(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object, so that numpy adds no .npz to the name
                np.savez(
                    f,
                    scores=self.scores,
                    targets=self.targets,
                    multilabel=np.array(self.multilabel),
                    **{k: np.array(v, dtype=str) for k, v in text.items()},
                )

        def write_h5(tmp: str) -> None:
            import h5py

            with h5py.File(tmp, "w") as f:
                f.create_dataset("scores", data=self.scores)
                f.create_dataset("targets", data=self.targets)
                for k, v in text.items():
                    f.create_dataset(k, data=np.array(v, dtype=object), dtype=h5py.string_dtype())
                f.attrs["multilabel"] = bool(self.multilabel)

        atomic_write(path, write_npz if suffix == ".npz" else write_h5)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Predictions:
        """Read a file written by `save`."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in PREDICTION_SUFFIXES:
            raise EvaluationError(f"{path}: expected an .npz, .h5 or .hdf5 predictions file")
        try:
            if suffix == ".npz":
                with np.load(path, allow_pickle=False) as f:
                    data = {k: f[k] for k in f.files}
                multilabel = bool(data.pop("multilabel"))
                text = {k: [str(s) for s in data.pop(k).tolist()] for k in _TEXT_KEYS if k in data}
            else:
                import h5py

                with h5py.File(path, "r") as f:
                    data = {k: f[k][()] for k in f.keys()}
                    multilabel = bool(f.attrs["multilabel"])
                text = {k: [_text(s) for s in data.pop(k).tolist()] for k in _TEXT_KEYS if k in data}
            ids, names = text["class_ids"], text["class_names"]
            return cls(
                text["paths"],
                data["scores"],
                data["targets"],
                list(zip(ids, names, strict=True)),
                multilabel,
                text.get("skipped", []),
                text.get("missing", []),
            )
        except EvaluationError:
            raise
        except (OSError, KeyError, ValueError) as e:
            raise EvaluationError(
                f"{path}: not a readable predictions file ({type(e).__name__}: {e})"
            ) from None


_TEXT_KEYS = ("paths", "class_ids", "class_names", "skipped", "missing")


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def match_classes(
    model_labels: Sequence[tuple[str, str]], data_classes: Sequence[tuple[str, str]]
) -> list[int | None]:
    """Model column for each dataset class (id, name): same id (e.g. AudioSet mid), else same name, else
    one's id equal to the other's name, else the same name ignoring case; None when nothing matches."""
    tables: list[tuple[Callable[[str, str], str], dict[str, int]]] = []
    for key_of, model_key in (
        (lambda cid, name: cid, lambda mid, name: mid),
        (lambda cid, name: name, lambda mid, name: name),
        (lambda cid, name: name, lambda mid, name: mid),
        (lambda cid, name: cid, lambda mid, name: name),
        (lambda cid, name: name.casefold(), lambda mid, name: name.casefold()),
    ):
        table: dict[str, int] = {}
        for i, (mid, name) in enumerate(model_labels):
            table.setdefault(model_key(mid, name), i)
        tables.append((key_of, table))
    out: list[int | None] = []
    for cid, name in data_classes:
        out.append(next((t[k(cid, name)] for k, t in tables if k(cid, name) in t), None))
    return out


def class_columns(
    model_labels: Sequence[tuple[str, str]], data: LabelledSet, where: str
) -> tuple[list[int], list[int]]:
    """(dataset class indices kept, model columns for them); unmatched classes with clips are an error."""
    columns = match_classes(model_labels, data.classes)
    positives = data.targets().sum(axis=0) if len(data) else np.zeros(len(data.classes))
    lacking = [data.classes[i][1] for i, col in enumerate(columns) if col is None and positives[i] > 0]
    if lacking:
        shown = ", ".join(repr(n) for n in lacking[:5]) + (", ..." if len(lacking) > 5 else "")
        raise EvaluationError(
            f"{where}: the checkpoint's {len(model_labels)} classes do not cover {len(lacking)} of the"
            f" dataset's labels ({shown}); classes are matched by id (mid) or name"
        )
    kept = [i for i, col in enumerate(columns) if col is not None]
    return kept, [columns[i] for i in kept]


def _source(example, skipped: list[str], name: str):
    """A path (or tar member), or the decoded part of a file when the example names an offset."""
    if example.offset is None:
        return example.source
    try:
        wave = load_audio(example.path, SAMPLE_RATE)
    except AudioError as e:
        skipped.append(f"{name}: {e.reason}")
        return None
    start = int(round(example.offset * SAMPLE_RATE))
    stop = None if example.duration is None else start + int(round(example.duration * SAMPLE_RATE))
    return wave[start:stop], SAMPLE_RATE


def predict(
    model,
    data: LabelledSet,
    options: PipelineOptions | None = None,
    *,
    multilabel: bool | None = None,
    labels: Sequence[tuple[str, str]] | None = None,
    where: str = "checkpoint",
    progress: Callable[[str | None], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    stop: Callable[[], bool] | None = None,
    **overrides,
) -> Predictions:
    """Run a Classifier over every clip of `data` and keep the scores of the dataset's classes.

    `labels` are the model's (id, name) classes (default `model.labels`); `multilabel` picks sigmoid
    or softmax scores (default: the data set's kind). `options` (or their fields as keywords) say how
    the model runs (windows, batching, device, precision, normalization; see `PipelineOptions`).
    Files that fail to decode are left out and listed in `skipped`, clips listed without audio in
    `missing`; `progress(error_or_None)` is called once per file, after `on_start(n)` with the number of clips
    this process runs (a torchrun rank's share). When `stop()` turns true (checked
    after each file) the run ends there and the predictions of the files done so far are returned,
    with `complete` false.

    Under `torchrun` every rank calls this with the same arguments and predicts its share of the
    clips (`partition.my_share`); rank 0 gets everyone's predictions in dataset order (incomplete if
    any rank was stopped), the other ranks their own.
    """
    labels = labels if labels is not None else getattr(model, "labels", None)
    if not labels or len(labels) != model.cfg.num_classes:
        found = len(labels) if labels else "no"
        raise EvaluationError(
            f"{where}: the model has {model.cfg.num_classes} classes but {found} class names"
        )
    multilabel = data.multilabel if multilabel is None else multilabel
    stop = stop or (lambda: False)
    kept, columns = class_columns(labels, data, where)
    targets = data.targets()[:, kept]
    skipped: list[str] = []
    sources, rows = [], []
    share = my_share([example.source for example in data.examples])
    if on_start is not None:
        on_start(len(share))
    for row in share:
        if stop():
            break
        source = _source(data.examples[row], skipped, data.name(data.examples[row]))
        if source is not None:
            sources.append(source)
            rows.append(row)
        elif progress is not None:
            progress(skipped[-1])
    paths, scores, good = [], [], []
    names = [data.name(data.examples[row]) for row in rows]
    results = tag(model, sources, pipeline_options(options, **overrides), multilabel=multilabel, names=names)
    done = len(share) - len(sources)  # those skipped before decoding
    try:
        for row, res in zip(rows, results, strict=False):
            done += 1
            if res.error is not None:
                skipped.append(res.error)
            else:
                paths.append(data.name(data.examples[row]))
                scores.append(res.scores[columns])
                good.append(row)
            if progress is not None:
                progress(res.error)
            if stop():
                break
    finally:
        results.close()  # an early stop ends the decoding workers and drops the windows queued
    complete = done == len(share) and not stop()
    shares = distributed.gather_objects((paths, scores, good, skipped, complete))
    if shares is not None and len(shares) > 1:  # rank 0 of several: everyone's, in dataset order
        paths, scores, good, skipped = [sum((part[k] for part in shares), []) for k in range(4)]
        complete = all(part[4] for part in shares)
    matrix = np.stack(scores) if scores else np.zeros((0, len(kept)), dtype=np.float32)
    classes = [data.classes[i] for i in kept]
    pred = Predictions(paths, matrix, targets[good], classes, multilabel, skipped, list(data.missing))
    pred.complete = complete
    return pred


def _finite(value: float) -> float | None:
    """JSON-safe number: NaN and infinities become None."""
    return float(value) if value is not None and math.isfinite(value) else None


def summarize(pred: Predictions, by_polyphony: bool = False) -> dict:
    """The headline numbers as one JSON-ready dict (NaN / infinite values as None).

    Multi-label: mAP (macro, over classes with positives), d_prime, auc, n_clips, n_classes_scored,
    n_classes_without_positives. Multi-class: accuracy, top_k (the top-k accuracy), k (= min(5,
    classes)), balanced_accuracy, n_clips. Both: n_classes, n_skipped (files that could not be read),
    n_missing (clips listed without audio); `polyphony` on request.
    """
    n_clips = len(pred.paths)
    if pred.multilabel:
        report = multilabel_report(pred.scores, pred.targets)
        out = {
            "mAP": _finite(report["mAP"]),
            "d_prime": _finite(report["d_prime"]),
            "auc": _finite(report["AUC"]),
            "n_clips": n_clips,
            "n_classes_scored": report["n_classes"] - report["n_skipped_ap"],
            "n_classes_without_positives": report["n_skipped_ap"],
        }
    else:
        if n_clips and (pred.targets.sum(axis=1) != 1).any():
            raise EvaluationError("multi-class scoring needs exactly one label per clip")
        report = multiclass_report(pred.scores, pred.targets.argmax(axis=1))
        out = {
            "accuracy": _finite(report["accuracy"]),
            "top_k": _finite(report["top5"]),
            "k": report["k"],
            "balanced_accuracy": _finite(report["balanced_accuracy"]),
            "n_clips": n_clips,
        }
    out["n_classes"] = len(pred.classes)
    out["n_skipped"] = len(pred.skipped)
    out["n_missing"] = len(pred.missing)
    if by_polyphony:
        out["polyphony"] = {
            name: {**v, "mAP": _finite(v["mAP"])}
            for name, v in polyphony_report(pred.scores, pred.targets).items()
        }
    return out


def headline(summary: dict) -> tuple[str, float | None]:
    """The metric a report leads with: ("mAP", value) for multi-label, ("accuracy", value) otherwise."""
    return ("mAP", summary["mAP"]) if "mAP" in summary else ("accuracy", summary["accuracy"])


def per_class(pred: Predictions) -> list[dict]:
    """One row per class (name, mid, positives, AP, AUC; accuracy for multi-class), worst AP first.

    Classes without positives (AP undefined) come last.
    """
    ap = (
        average_precision(pred.scores, pred.targets)
        if len(pred.paths)
        else np.full(len(pred.classes), np.nan)
    )
    auc = roc_auc(pred.scores, pred.targets) if len(pred.paths) else np.full(len(pred.classes), np.nan)
    positives = pred.targets.sum(axis=0).astype(int)
    accuracy = None
    if not pred.multilabel and len(pred.paths):
        accuracy = multiclass_report(pred.scores, pred.targets.argmax(axis=1))["per_class_accuracy"]
    rows = []
    for c, (mid, name) in enumerate(pred.classes):
        row = {
            "name": name,
            "mid": mid,
            "positives": int(positives[c]),
            "AP": float(ap[c]),
            "AUC": float(auc[c]),
        }
        if accuracy is not None:
            row["accuracy"] = float(accuracy[c])
        rows.append(row)
    return sorted(rows, key=lambda r: (math.isnan(r["AP"]), r["AP"] if not math.isnan(r["AP"]) else 0.0))


def per_class_csv(rows: Sequence[dict]) -> str:
    """CSV text of `per_class` rows; undefined values are left empty."""
    import io

    buf = io.StringIO()
    columns = list(rows[0]) if rows else ["name", "mid", "positives", "AP", "AUC"]
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        cells = []
        for key in columns:
            value = row[key]
            if isinstance(value, float):
                value = "" if math.isnan(value) else f"{value:.6f}"
            cells.append(value)
        writer.writerow(cells)
    return buf.getvalue()


__all__ = [
    "EvaluationError",
    "Predictions",
    "class_columns",
    "match_classes",
    "per_class",
    "per_class_csv",
    "headline",
    "predict",
    "summarize",
]
