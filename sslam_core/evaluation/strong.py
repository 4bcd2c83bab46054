"""Sound event detection scored against DCASE strong labels (`sslam eval --strong`).

Metrics, on the predictions that `sslam tag --events` writes (same windows, step scores, median
filter, thresholds, hysteresis, minimum duration and gap merge):

- **event-based F1** (collar-based, as in DCASE 2016-2020 and sed_eval): a detected event matches a
  reference event of its class when their onsets differ by at most `collar` and their offsets by at
  most max(`collar`, `offset_collar_rate` x the reference's length); one-to-one matching.
- **segment-based F1**: the time line cut into `segment_length` segments; a class counts as active in a
  segment when an event of it overlaps the segment, in the detections and in the reference.
- **PSDS** (intersection-based, threshold-independent; DCASE 2021-2024 scenario 1 by default:
  detection and ground-truth tolerance criteria 0.7, alpha_ST 1, alpha_CT 0, eFPR up to 100 per
  hour): from the (median-filtered) step scores, over all thresholds.

The F1 scores are computed on the events themselves: each file's events become a 0/1 score over
the intervals between their boundaries, which the library thresholds at 0.5, so it scores exactly
the events written. Classes without a reference event in the evaluated files are left out (as the
clip-level evaluation leaves out classes without positives).

Library: `sed_scores_eval` (fgnt, Paderborn; the DCASE task 4 evaluation since 2023), in the `sed`
extra. It computes all three metrics from the same score tables (psds_eval gives PSDS only, on a
threshold grid; sed_eval gives the F1 scores only), exactly over all thresholds. It is a source
package built with Cython (about a minute from a clean virtualenv, wheels for everything else); its
pins in the extra: pandas < 3 (pandas 3's read-only arrays break its Cython detection code) and
setuptools < 81 (sed_eval's dcase_util imports pkg_resources).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from sslam_core.data.label_formats import read_lines, stem
from sslam_core.errors import OptionError, SslamError
from sslam_core.inference.events import (
    Event,
    EventOptions,
    detect,
    result_step_scores,
    smoothed,
    tag_token_steps,
)
from sslam_core.inference.options import PipelineOptions
from sslam_core.inference.partition import my_share
from sslam_core.inference.tagging import tag
from sslam_core.runs import distributed

EXTRA_HINT = "strong-label evaluation needs the sed extra: pip install 'sslam[sed]' (sed_scores_eval)"

Interval = tuple[float, float, str]  # onset, offset, label


class StrongEvalError(SslamError, ValueError):
    """A strong-label file that cannot be used; the message is one line naming the file."""


class SedUnavailable(SslamError, ImportError):
    """The `sed` extra is not installed; the message is one line naming it."""


def library():
    """The sed_scores_eval module (its dependencies' import-time deprecation warnings silenced), or
    SedUnavailable naming the extra."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import sed_scores_eval
            from sed_scores_eval.base_modules.scores import create_score_dataframe  # noqa: F401
    except ImportError as e:
        raise SedUnavailable(EXTRA_HINT) from e
    return sed_scores_eval


@dataclass(frozen=True)
class StrongOptions:
    """Metric settings: collars and segment length in seconds; PSDS parameters (DCASE scenario 1)."""

    collar: float = 0.2
    offset_collar_rate: float = 0.2
    segment_length: float = 1.0
    dtc: float = 0.7
    gtc: float = 0.7
    alpha_ct: float = 0.0
    alpha_st: float = 1.0
    max_efpr: float = 100.0

    def __post_init__(self) -> None:
        if self.collar < 0 or self.offset_collar_rate < 0:
            raise OptionError(f"collars must not be negative ({self.collar}, {self.offset_collar_rate})")
        if self.segment_length <= 0:
            raise OptionError(f"the segment length must be positive, got {self.segment_length}")
        if not (0 < self.dtc <= 1 and 0 < self.gtc <= 1):
            raise OptionError(f"PSDS tolerance criteria must lie in (0, 1], got {self.dtc}, {self.gtc}")


@dataclass
class StrongLabels:
    """Reference events of a DCASE strong-label file, by file key (name without folder and extension,
    as `datasets.Example.key`); files listed without events have an empty list."""

    path: str
    events: dict[str, list[Interval]]
    lines: dict[str, list[int]] = field(default_factory=dict)  # each event's line number, as `events`

    def numbered(self) -> list[tuple[int, str, Interval]]:
        """(line number, file key, event) of every event, in file order (line 0 when not known)."""
        out = []
        for key, events in self.events.items():
            numbers = self.lines.get(key) or [0] * len(events)
            out += [(n, key, event) for n, event in zip(numbers, events, strict=True)]
        return sorted(out, key=lambda item: item[0])

    def check_labels(self, known: Iterable[str], where: str) -> None:
        """A StrongEvalError naming `PATH:LINE` for the first event whose label is none of `known`
        (a model's class ids and names; `where` names the model)."""
        known = set(known)
        for number, _, (_, _, label) in self.numbered():
            if label not in known:
                raise StrongEvalError(
                    f"{self.path}:{number}: label {label!r} is not a class of {where} (matched by id or name)"
                )

    def past_the_end(self, durations: dict[str, float], tolerance: float = 0.05) -> list[str]:
        """`PATH:LINE: ...` for each event that ends after its file does (by more than `tolerance`
        seconds: label tools round times); `durations` by file key. Scoring cuts them at the end."""
        return [
            f"{self.path}:{number}: the event ends at {offset:g} s, after the end of {key} "
            f"({durations[key]:.3f} s)"
            for number, key, (_, offset, _) in self.numbered()
            if key in durations and offset > durations[key] + tolerance
        ]


def read_strong_events(path: str) -> StrongLabels:
    """`filename<TAB>onset<TAB>offset<TAB>event_label` lines (a header line is allowed; a line with only
    a filename, or empty onset, offset and label, lists a file without events); StrongEvalError naming
    the file and line otherwise."""
    from sslam_core.data.label_formats import DatasetError

    try:
        lines = read_lines(path)
    except DatasetError as e:
        raise StrongEvalError(str(e)) from None
    events: dict[str, list[Interval]] = {}
    numbers: dict[str, list[int]] = {}
    for number, line in enumerate(lines, 1):
        cells = [c.strip() for c in line.split("\t")]
        if not line.strip() or (number == 1 and cells[0].lower() in ("filename", "file", "path")):
            continue
        if len(cells) == 1 and line.count(",") >= 2 and not line.lstrip().startswith('"'):
            raise StrongEvalError(
                f"{path}:{number}: the line is comma-separated; strong labels are tab-separated: "
                "filename<TAB>onset<TAB>offset<TAB>event_label"
            )
        listed = events.setdefault(stem(cells[0]), [])
        numbered = numbers.setdefault(stem(cells[0]), [])
        if len(cells) == 1 or (len(cells) >= 4 and not any(cells[1:4])):
            continue
        try:
            if len(cells) < 4 or not cells[3]:
                raise ValueError
            onset, offset = float(cells[1]), float(cells[2])
        except ValueError:
            raise StrongEvalError(
                f"{path}:{number}: expected filename<TAB>onset<TAB>offset<TAB>event_label"
            ) from None
        if not 0 <= onset < offset or not math.isfinite(offset):
            raise StrongEvalError(
                f"{path}:{number}: onset {onset} and offset {offset}: need 0 <= onset < offset"
            )
        listed.append((onset, offset, cells[3]))
        numbered.append(number)
    if not events:
        raise StrongEvalError(f"{path}: no events listed")
    return StrongLabels(path, events, numbers)


@dataclass
class FilePrediction:
    """One file's predictions: duration, step starts (S,), smoothed step scores (S, C) and events."""

    duration: float
    starts: np.ndarray
    scores: np.ndarray
    events: list[Event]


def predict_events(
    model,
    sources: Sequence[str],
    keys: Sequence[str],
    labels: Sequence[tuple[str, str]],
    options: EventOptions,
    pipeline: PipelineOptions,
    *,
    frame_scores: str = "window",
    progress: Callable[[str | None], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    stop: Callable[[], bool] | None = None,
    names: Sequence[str] | None = None,
) -> tuple[dict[str, FilePrediction], list[str]]:
    """({key: FilePrediction}, skip reasons): the events `sslam tag --events` finds in each source,
    with the step scores they come from (`frame_scores` "window" or "token"), the model run as
    `pipeline` says; `names` (default the sources) name the files in skip reasons. `on_start(n)` is
    called with the number of files this process runs, then `progress(error_or_None)` after each.

    Under `torchrun` every rank calls this with the same arguments and runs its share of the files
    (`partition.my_share`); rank 0 gets everyone's predictions in the order of `keys`, the other ranks
    their own."""
    tagger = tag_token_steps if frame_scores == "token" else tag
    multilabel = getattr(model, "multilabel", True)
    share = my_share(list(sources))
    if on_start is not None:
        on_start(len(share))
    mine = [sources[i] for i in share]
    mine_names = [names[i] for i in share] if names is not None else None
    results = tagger(model, mine, pipeline, multilabel=multilabel, stop=stop, names=mine_names)
    out, skipped = {}, []
    for i, res in zip(share, results, strict=False):  # shorter when stopped
        if res.error is None:
            starts, scores = result_step_scores(res, options.step)
            found = detect(starts, scores, res.duration, labels, options)
            out[keys[i]] = FilePrediction(res.duration, starts, smoothed(scores, options), found)
        else:
            skipped.append(res.error)
        if progress is not None:
            progress(res.error)
    parts = distributed.gather_objects((out, skipped))
    if parts is not None and len(parts) > 1:  # rank 0 of several: everyone's, in the order of `keys`
        merged = {k: v for part, _ in parts for k, v in part.items()}
        out = {k: merged[k] for k in keys if k in merged}
        skipped = [reason for _, part in parts for reason in part]
    return out, skipped


def _frame_table(bounds: np.ndarray, values: np.ndarray, classes: Sequence[str]):
    return library().base_modules.scores.create_score_dataframe(
        np.nan_to_num(values, nan=0.0), bounds, list(classes)
    )


def event_scores(events: Iterable[Interval], duration: float, classes: Sequence[str]):
    """A score table that is 1 inside each event and 0 elsewhere (events of other classes ignored):
    thresholded at 0.5 it gives back exactly `events`."""
    events = [e for e in events if e[2] in classes]
    bounds = np.unique(np.clip([0.0, duration, *(t for e in events for t in e[:2])], 0.0, duration))
    centres = (bounds[:-1] + bounds[1:]) / 2
    values = np.zeros((len(centres), len(classes)))
    column = {c: i for i, c in enumerate(classes)}
    for onset, offset, label in events:
        values[(centres > onset) & (centres < offset), column[label]] = 1.0
    return _frame_table(bounds, values, classes)


def step_table(starts: np.ndarray, scores: np.ndarray, duration: float, classes: Sequence[str]):
    """A score table of step scores (S, C) starting at `starts`, the last step ending at `duration`."""
    return _frame_table(np.append(starts, duration), scores, classes)


def _number(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def score(
    reference: dict[str, list[Interval]],
    durations: dict[str, float],
    detected: dict[str, list[Interval]],
    tables: dict[str, object],
    classes: Sequence[str],
    options: StrongOptions,
) -> dict:
    """Event-based and segment-based F1 of `detected` and PSDS of the score `tables` (`step_table`s),
    against `reference`, for `classes`, per class and averaged (see the module docstring). All dicts
    are keyed by the same files; labels are names in `classes`."""
    lib = library()
    truth = {k: [e for e in v if e[2] in classes] for k, v in reference.items()}
    binary = {k: event_scores(detected.get(k, []), durations[k], classes) for k in truth}
    ev_f, ev_p, ev_r, ev_stats = lib.collar_based.fscore(
        binary, truth, 0.5, onset_collar=options.collar, offset_collar=options.collar,
        offset_collar_rate=options.offset_collar_rate,
    )  # fmt: skip
    seg_f, seg_p, seg_r, _ = lib.segment_based.fscore(
        binary, truth, durations, 0.5, segment_length=options.segment_length
    )
    psds, class_psds, *_ = lib.intersection_based.psds(
        {k: tables[k] for k in truth}, truth, durations, dtc_threshold=options.dtc,
        gtc_threshold=options.gtc, alpha_ct=options.alpha_ct, alpha_st=options.alpha_st,
        max_efpr=options.max_efpr,
    )  # fmt: skip

    def averages(f, p, r) -> dict:
        return {
            "f1_macro": _number(f["macro_average"]),
            "f1_micro": _number(f["micro_average"]),
            "precision_micro": _number(p["micro_average"]),
            "recall_micro": _number(r["micro_average"]),
        }

    counts = {c: [0, 0] for c in classes}
    for k in truth:
        for _, _, label in truth[k]:
            counts[label][0] += 1
        for _, _, label in detected.get(k, []):
            if label in counts:
                counts[label][1] += 1
    return {
        "event_based": {**averages(ev_f, ev_p, ev_r), "onset_collar": options.collar,
                        "offset_collar": options.collar, "offset_collar_rate": options.offset_collar_rate},
        "segment_based": {**averages(seg_f, seg_p, seg_r), "segment_length": options.segment_length},
        "psds": {"value": _number(psds), "dtc_threshold": options.dtc, "gtc_threshold": options.gtc,
                 "alpha_ct": options.alpha_ct, "alpha_st": options.alpha_st, "max_efpr": options.max_efpr},
        "n_clips": len(truth),
        "n_reference_events": sum(n for n, _ in counts.values()),
        "n_detected_events": sum(n for _, n in counts.values()),
        "classes": [
            {"label": c, "references": counts[c][0], "detections": counts[c][1],
             "event_f1": _number(ev_f[c]), "event_precision": _number(ev_p[c]),
             "event_recall": _number(ev_r[c]), "segment_f1": _number(seg_f[c]),
             "psds": _number(class_psds[c])}
            for c in classes
        ],
    }  # fmt: skip


def score_predictions(
    truth: StrongLabels,
    predictions: dict[str, FilePrediction],
    labels: Sequence[tuple[str, str]],
    columns: dict[str, int],
    options: StrongOptions,
) -> dict:
    """`score` of `predict_events`' output: `columns` maps each reference label to the model column
    whose display name (in `labels`) the detected events carry; only the predicted files count, and
    only classes with a reference event in them. Reference events are cut at their file's end."""
    names = {label: labels[col][1] for label, col in columns.items()}
    reference = {  # events past the end of their file cut there (`StrongLabels.past_the_end` names them)
        k: [(a, min(b, p.duration), names[c]) for a, b, c in truth.events[k] if c in names and a < p.duration]
        for k, p in predictions.items()
    }
    present = {c for events in reference.values() for _, _, c in events}
    kept = sorted({col for label, col in columns.items() if names[label] in present})
    classes = [labels[col][1] for col in kept]
    if not classes:
        raise StrongEvalError(f"{truth.path}: no reference events in the files that could be evaluated")
    tables = {k: step_table(p.starts, p.scores[:, kept], p.duration, classes) for k, p in predictions.items()}
    detected = {k: [(e.onset, e.offset, e.label) for e in p.events] for k, p in predictions.items()}
    durations = {k: p.duration for k, p in predictions.items()}
    return score(reference, durations, detected, tables, classes, options)
