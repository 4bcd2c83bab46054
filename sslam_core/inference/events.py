"""Sound events from a tagger's windows: per-time-step class scores, then onset / offset events.

A tagger scores whole windows (10.24 s for the AudioSet models). Run with overlapping windows
(`--hop` a fraction of the window), each time step of `step` seconds is covered by several windows;
its score for a class is the **mean** over the windows that cover the step's centre. The mean, not
the clip score's max, because a step is inside every window that covers it, and windows that see
only the step's neighbourhood lower the score where a sound stops: onsets and offsets move towards
where the windows disagree, while the max would stretch every event to the full width of the
windows that contain it.

Token frame scores (`frame_scores="token"`, for classifiers with mean pooling): the head applied to
each 160 ms step's tokens (the mean of its frequency patches, through the same norm and linear layer
that the clip's mean token goes through), so that one window gives a score per step; where windows
overlap, a step's score is again the mean over the windows covering it. Window scores need windows
much shorter than the events' spacing to place them; token scores place events inside one window.

Events per class: active where the score reaches `threshold`, and (hysteresis) stays active until it
falls below `off_threshold`; scores are first smoothed by a median filter of `median` seconds; events
closer than `min_gap` seconds are merged and events shorter than `min_duration` dropped. An event's
score is its peak score.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from sslam_core.audio.constants import FRAMES_PER_SECOND, STEP_SECONDS
from sslam_core.errors import OptionError
from sslam_core.inference.options import PipelineOptions, pipeline_options
from sslam_core.inference.pipeline import run_windows
from sslam_core.inference.tagging import TagResult
from sslam_core.models.transformer import FREQ_PATCHES, Classifier


@dataclass(frozen=True)
class EventOptions:
    """How step scores become events (see the module docstring); thresholds in [0, 1], times in s."""

    threshold: float = 0.5
    off_threshold: float | None = None  # default: the threshold (no hysteresis)
    median: float = 0.0
    min_duration: float = 0.0
    min_gap: float = 0.0
    step: float = STEP_SECONDS
    per_class: tuple[tuple[int, float], ...] = ()  # (class index, threshold) overriding `threshold`

    def __post_init__(self) -> None:
        for on in (self.threshold, *(t for _, t in self.per_class)):
            off = on if self.off_threshold is None else min(self.off_threshold, on)
            if not 0.0 <= off <= on <= 1.0:
                raise OptionError(
                    f"thresholds must satisfy 0 <= off threshold ({off}) <= threshold ({on}) <= 1"
                )
        if self.off_threshold is not None and not 0.0 <= self.off_threshold <= self.threshold:
            raise OptionError(f"the off threshold {self.off_threshold} must lie in [0, {self.threshold}]")
        for name in ("median", "min_duration", "min_gap"):
            if getattr(self, name) < 0:
                raise OptionError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.step <= 0:
            raise OptionError(f"step must be positive, got {self.step}")


@dataclass(frozen=True)
class Event:
    """One detected sound event."""

    onset: float
    offset: float
    label: str
    mid: str
    score: float


def _coverage(
    segments: Sequence[tuple[float, float, np.ndarray]], duration: float, step: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(starts, first, end, count): the start of every step of `step` s over [0, duration], and for each
    window the range [first, end) of steps whose centre it covers, and how many windows cover each
    step. Windows cover contiguous steps, so this is two binary searches a window."""
    n = max(1, int(np.ceil(duration / step - 1e-9)))
    starts = np.arange(n) * step
    centres = np.minimum(starts + step / 2, duration)
    spans = np.array([(a, b) for a, b, _ in segments], dtype=np.float64).reshape(-1, 2)
    first = np.searchsorted(centres, spans[:, 0], side="left")
    end = np.searchsorted(centres, spans[:, 1], side="right")
    count = np.zeros(n + 1, dtype=np.int64)
    np.add.at(count, first, 1)
    np.add.at(count, end, -1)
    return starts, first, end, np.cumsum(count[:-1])


def _covered_mean(values: np.ndarray, first: np.ndarray, end: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Per step, the mean of `values` (W, ...) over the windows covering it (NaN where none does): a
    running sum of the windows entering and leaving, linear in windows + steps."""
    n = len(count)
    total = np.zeros((n + 1, *values.shape[1:]), dtype=np.float64)
    np.add.at(total, first, values)
    np.add.at(total, end, -values)
    total = np.cumsum(total[:-1], axis=0)
    shape = (n,) + (1,) * (values.ndim - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count.reshape(shape) > 0, total / count.reshape(shape), np.nan)


def step_scores(
    segments: Sequence[tuple[float, float, np.ndarray]], duration: float, step: float = STEP_SECONDS
) -> tuple[np.ndarray, np.ndarray]:
    """(starts, scores): the start time of every step of `step` s over [0, duration] and its (S, C)
    scores, the mean over the windows `(start, end, scores)` covering the step's centre (NaN where no
    window does, as between windows when the hop is longer than the window). Time and memory are
    linear in windows + steps (the steps of a day-long file at 160 ms are 540,000)."""
    starts, first, end, count = _coverage(segments, duration, step)
    scores = np.stack([s for _, _, s in segments]).astype(np.float64)
    return starts, _covered_mean(scores, first, end, count)


FRAME_SCORES = ("window", "token")


@dataclass
class StepTagResult(TagResult):
    """A TagResult with per-step scores from the tokens: `steps` holds (start, end, scores) per 160 ms
    step of every window."""

    steps: list[tuple[float, float, np.ndarray]] = field(default_factory=list)


def check_token_scores(model: Classifier) -> None:
    """A ValueError saying why `model` cannot give token frame scores (mean pooling, a PyTorch head)."""
    from sslam_core.models.onnx_runtime import OnnxModel

    if isinstance(model, OnnxModel):
        instead = "" if model.cached_for is None else "; run another --precision"
        raise OptionError(
            f"token frame scores need the PyTorch model ({model.described} gives clip logits only{instead})"
        )
    if model.cfg.pool != "mean":
        raise OptionError(
            f"token frame scores need a classifier with mean pooling; this one pools {model.cfg.pool!r}"
            " (use window frame scores)"
        )


def _token_head(model: Classifier, multilabel: bool):
    """Per-window clip scores ("scores", as `tagging.tag`) and per-step token scores ("steps")."""

    def probabilities(logits: Tensor) -> Tensor:
        return torch.sigmoid(logits.float()) if multilabel else logits.float().softmax(dim=-1)

    def head(x: Tensor) -> dict[str, Tensor]:
        feats = model.features(x)
        patches = feats[:, 1:]
        B, N, D = patches.shape
        steps = patches.reshape(B * (N // FREQ_PATCHES), FREQ_PATCHES, D).mean(dim=1)  # (B x T, D)
        per_step = model.classify(steps).reshape(B, N // FREQ_PATCHES, -1)
        return {"scores": probabilities(model.classify(feats)), "steps": probabilities(per_step)}

    return head


def tag_token_steps(
    model: Classifier,
    sources,
    options: PipelineOptions | None = None,
    *,
    multilabel: bool = True,
    stop: Callable[[], bool] | None = None,
    names: Sequence[str] | None = None,
    **overrides,
):
    """`tagging.tag` with token frame scores: yields StepTagResults (clip scores and window segments as
    `tagging.tag` gives them, plus `steps`); `check_token_scores` says whether `model` can."""
    o = pipeline_options(options, **overrides)
    target_length = o.target_length
    results = run_windows(model, sources, _token_head(model, multilabel), o, stop=stop, names=names)
    for res in results:
        if res.error is not None:
            yield StepTagResult(res.path, error=res.error)
            continue
        windows, steps = res.stacked("scores").numpy(), res.stacked("steps").numpy()
        segments = [(a / FRAMES_PER_SECOND, min((a + target_length) / FRAMES_PER_SECOND, res.duration), s)
                    for a, s in zip(res.starts, windows, strict=True)]  # fmt: skip
        tokens = []
        for a, row in zip(res.starts, steps, strict=True):
            times = a / FRAMES_PER_SECOND + np.arange(len(row)) * STEP_SECONDS
            tokens += [(t, min(t + STEP_SECONDS, res.duration), s)
                       for t, s in zip(times, row, strict=True) if t < res.duration]  # fmt: skip
        yield StepTagResult(res.path, res.duration, windows.max(axis=0), segments, steps=tokens)


def result_step_scores(res: TagResult, step: float = STEP_SECONDS) -> tuple[np.ndarray, np.ndarray]:
    """`step_scores` of a tag result: from its token steps when it has them, else from its windows."""
    return step_scores(getattr(res, "steps", None) or res.segments, res.duration, step)


def smoothed(scores: np.ndarray, options: EventOptions) -> np.ndarray:
    """Step scores after the median filter of `options.median` seconds (what thresholds are applied to)."""
    width = int(round(options.median / options.step)) | 1 if options.median > 0 else 1
    return _median_filter(scores, width)


def _median_filter(x: np.ndarray, width: int) -> np.ndarray:
    """Running median over time (axis 0) of `width` steps (odd), edges padded with the edge values."""
    if width <= 1:
        return x
    half = width // 2
    padded = np.pad(x, ((half, half), (0, 0)), mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, width, axis=0)
    if not np.isnan(x).any():
        return np.median(windows, axis=-1)
    with warnings.catch_warnings():  # steps no window covers stay NaN, silently
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(windows, axis=-1)


def _runs(on: np.ndarray, hold: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) step ranges that begin where `on` and continue while `hold` (hysteresis; `on`
    implies `hold`): in each stretch of `hold`, from its first `on` step to the stretch's end."""
    if not on.any():
        return []
    edges = np.diff(np.concatenate([[0], hold.astype(np.int8), [0]]))
    stretch_start, stretch_end = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    on_steps = np.flatnonzero(on)
    k = np.minimum(np.searchsorted(on_steps, stretch_start), len(on_steps) - 1)
    first_on = on_steps[k]
    keep = (first_on >= stretch_start) & (first_on < stretch_end)
    return list(zip(first_on[keep].tolist(), stretch_end[keep].tolist(), strict=True))


def class_events(
    starts: np.ndarray, column: np.ndarray, duration: float, c: int, labels, options: EventOptions
) -> list[Event]:
    """The events of class `c` from its step scores `column` (S,), median-filtered here."""
    s = np.nan_to_num(smoothed(column[:, None], options)[:, 0], nan=0.0)
    on = dict(options.per_class).get(c, options.threshold)
    off = on if options.off_threshold is None else min(options.off_threshold, on)
    spans = [[starts[a], min(starts[b - 1] + options.step, duration), s[a:b].max()] for a, b in _runs(
        s >= on, s >= off
    )]  # fmt: skip
    merged: list[list[float]] = []
    for span in spans:
        if merged and span[0] - merged[-1][1] < options.min_gap:
            merged[-1][1], merged[-1][2] = span[1], max(merged[-1][2], span[2])
        else:
            merged.append(span)
    mid, name = labels[c]
    return [
        Event(round(a, 3), round(b, 3), name, mid, float(p))
        for a, b, p in merged
        if b - a >= options.min_duration
    ]


def detect(
    starts: np.ndarray,
    scores: np.ndarray,
    duration: float,
    labels: Sequence[tuple[str, str]],
    options: EventOptions,
    classes: Sequence[int] | None = None,
) -> list[Event]:
    """Events of `classes` (default all) from step scores (S, C), sorted by onset then label."""
    events: list[Event] = []
    for c in range(scores.shape[1]) if classes is None else classes:
        events += class_events(starts, scores[:, c], duration, c, labels, options)
    return sorted(events, key=lambda e: (e.onset, e.label))


def detect_from_windows(
    segments: Sequence[tuple[float, float, np.ndarray]],
    duration: float,
    labels: Sequence[tuple[str, str]],
    options: EventOptions,
) -> list[Event]:
    """`detect(*step_scores(segments, ...))` class by class: each class's step scores are made from the
    windows, filtered and thresholded on their own, so memory stays at one class's steps (S,) beside
    the windows' scores however long the file (a day at 160 ms steps: 540,000 steps, where all
    classes at once would take gigabytes)."""
    starts, first, end, count = _coverage(segments, duration, options.step)
    scores = np.stack([s for _, _, s in segments])  # (W, C), as the windows gave them
    events: list[Event] = []
    for c in range(scores.shape[1]):
        column = _covered_mean(scores[:, c].astype(np.float64), first, end, count)
        events += class_events(starts, column, duration, c, labels, options)
    return sorted(events, key=lambda e: (e.onset, e.label))


def read_thresholds(path: str, labels: Sequence[tuple[str, str]]) -> tuple[tuple[int, float], ...]:
    """Per-class thresholds from a CSV `label,threshold` (a header line is allowed; the label is a
    display name or a mid); an unknown label or a bad number is a ValueError naming the line."""
    index = {key: i for i, (mid, name) in enumerate(labels) for key in (mid, name)}
    with open(path, encoding="utf-8-sig", newline="") as f:  # (line number, row) of the non-blank lines
        rows = [(n, r) for n, r in enumerate(csv.reader(f), 1) if r and any(c.strip() for c in r)]
    if rows and rows[0][1][-1].strip().lower() == "threshold":
        rows = rows[1:]
    out = []
    for number, row in rows:
        try:
            label, value = (c.strip() for c in row)
            out.append((index[label], float(value)))
        except (ValueError, KeyError):
            raise OptionError(
                f"{path}: line {number} {','.join(row)!r}: expected LABEL,THRESHOLD for a class of the model"
            ) from None
    return tuple(out)


EVENT_FORMATS = ("dcase", "audacity", "raven")  # besides tag's json (events inside) and table


def event_dicts(events: Sequence[Event]) -> list[dict]:
    """Events as JSON objects `{label, mid, onset, offset, score}`."""
    return [{"label": e.label, "mid": e.mid, "onset": e.onset, "offset": e.offset, "score": round(e.score, 6)}
            for e in events]  # fmt: skip


def render_events(path: str, events: Sequence[Event], fmt: str, first: bool, number: int = 1) -> str:
    """One file's events: DCASE TSV rows (`filename onset offset event_label score`, header when
    `first`), Audacity label lines (`onset offset label`, for one file), Raven selection-table rows
    numbered from `number` (header when `first`), or a JSON line `{"path", "events": [...]}`."""
    if fmt == "json":
        return json.dumps({"path": path, "events": event_dicts(events)}, ensure_ascii=False) + "\n"
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    if fmt == "dcase":
        if first:
            w.writerow(["filename", "onset", "offset", "event_label", "score"])
        w.writerows([path, f"{e.onset:.3f}", f"{e.offset:.3f}", e.label, f"{e.score:.6f}"] for e in events)
    elif fmt == "audacity":
        w.writerows([f"{e.onset:.6f}", f"{e.offset:.6f}", e.label] for e in events)
    elif fmt == "raven":
        if first:
            w.writerow(
                [
                    "Selection",
                    "View",
                    "Channel",
                    "Begin Time (s)",
                    "End Time (s)",
                    "Begin File",
                    "Annotation",
                    "Score",
                ]
            )
        w.writerows(
            [i, "Waveform 1", 1, f"{e.onset:.3f}", f"{e.offset:.3f}", path, e.label, f"{e.score:.6f}"]
            for i, e in enumerate(events, number)
        )
    else:
        raise OptionError(f"unknown event format {fmt!r}; choose {', '.join(EVENT_FORMATS)}")
    return buf.getvalue()
