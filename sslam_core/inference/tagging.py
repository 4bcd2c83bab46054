"""Audio tagging: class scores of whole files and of each window over time."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from sslam_core.audio.constants import FRAMES_PER_SECOND
from sslam_core.errors import OptionError
from sslam_core.inference.options import PipelineOptions, pipeline_options
from sslam_core.inference.pipeline import logits_head, run_windows
from sslam_core.inference.windows import Source
from sslam_core.models.transformer import Classifier


@dataclass
class TagResult:
    """Scores of one file. `scores` is the max over windows; `segments` holds each window's scores."""

    path: str
    duration: float = 0.0
    scores: np.ndarray | None = None  # (C,)
    segments: list[tuple[float, float, np.ndarray]] = field(default_factory=list)
    error: str | None = None

    def top(self, labels: Sequence[tuple[str, str]], k: int | None = None, threshold: float | None = None):
        """[(label, mid, score)] sorted by score, cut to the top k and/or to scores >= threshold."""
        order = np.argsort(-self.scores, kind="stable")
        if k is not None:
            order = order[:k]
        rows = [(labels[i][1], labels[i][0], float(self.scores[i])) for i in order]
        return [r for r in rows if threshold is None or r[2] >= threshold]


def tag(
    model: Classifier,
    sources: Sequence[Source],
    options: PipelineOptions | None = None,
    *,
    multilabel: bool = True,
    stop: Callable[[], bool] | None = None,
    names: Sequence[str] | None = None,
    **overrides,
) -> Iterator[TagResult]:
    """Tag each file path or (wave, sample_rate) pair: windows of `target_length` frames every `hop`,
    and the other `options` (or their fields as keywords: `target_length=`, `batch_size=`, ...)."""
    if not isinstance(model, Classifier):
        raise OptionError("tagging needs a fine-tuned checkpoint (one with a classification head)")
    o = pipeline_options(options, **overrides)
    target_length = o.target_length
    results = run_windows(model, sources, logits_head(model, multilabel), o, stop=stop, names=names)
    for res in results:
        if res.error is not None:
            yield TagResult(res.path, error=res.error)
            continue
        per_window = res.stacked("scores").numpy()
        segments = [
            (start / FRAMES_PER_SECOND, min((start + target_length) / FRAMES_PER_SECOND, res.duration), s)
            for start, s in zip(res.starts, per_window, strict=True)
        ]
        yield TagResult(res.path, res.duration, per_window.max(axis=0), segments)
