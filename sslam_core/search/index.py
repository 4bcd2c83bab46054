"""`Index`: the nearest clips or segments of an embedding store, for vectors or audio.

Below `EXACT_BELOW` vectors (or without faiss) every query is scored against every stored vector
(`exact`); above it an approximate index kept beside the store answers (`approximate`). Audio queries are
embedded with the store's own settings, read from its attributes: the checkpoint (or `checkpoint=`, whose
vectors must have the store's dimension), the teacher, the layer, the window and hop, the normalisation
and, for a frame store, the frame hop. A clip store compares a query's clip vector with each file's; a
frame store compares the mean of the query's frame vectors with every stored frame, and a match is that
frame's file and segment (`group=True`: the best segment of each file).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from sslam_core.errors import SslamError
from sslam_core.search import approximate as ann
from sslam_core.search.exact import search_blocks
from sslam_core.search.store import EmbeddingStore, SearchError, unit_rows

EXACT_BELOW = 250_000  # stored vectors up to which the search is exact (100k clips: a few ms a query)
IN_MEMORY_BYTES = 1 << 30  # an exact search keeps the vectors in memory up to this size, else streams


@dataclass(frozen=True)
class Match:
    """One neighbour of a query: its rank from 1, the file, the cosine, and for frames the segment."""

    rank: int
    path: str
    score: float
    start: float | None = None
    end: float | None = None


@dataclass
class QueryResult:
    """A query's matches, best first, or why it could not be answered."""

    query: str
    matches: list[Match]
    error: str | None = None


class Index:
    """An embedding store opened for search (see the module docstring).

    `approximate`: None decides by size (and whether faiss is installed), True or False forces it.
    `note` receives one-line notes (an index built, extended or rebuilt, faiss missing); `progress(total,
    what)` returns a callback counting the rows done while an index is built."""

    def __init__(
        self,
        store: str | os.PathLike,
        granularity: str | None = None,
        *,
        approximate: bool | None = None,
        exact_below: int = EXACT_BELOW,
        note: Callable[[str], None] = lambda text: None,
        progress: Callable[[int, str], Callable[[int], None]] | None = None,
    ):
        self.store = EmbeddingStore(store, granularity)
        self._note, self._progress = note, progress
        have = _faiss_available()
        if approximate and not have:
            self.store.close()
            raise SearchError("the approximate index needs faiss: pip install 'sslam[search]'")
        big = self.store.rows > exact_below
        if big and approximate is None and not have:
            note(f"note: {self.store.rows} vectors, but faiss is not installed "
                 "(pip install 'sslam[search]'); searching exactly, which takes longer")  # fmt: skip
        self.mode = "approximate" if (approximate or (approximate is None and big and have)) else "exact"
        self._approx: ann.ApproximateIndex | None = None
        self._matrix: np.ndarray | None = None

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def granularity(self) -> str:
        return self.store.granularity

    # -- vectors --------------------------------------------------------------------------------------------

    def search(self, vectors: np.ndarray, k: int = 10, group: bool = False) -> list[list[Match]]:
        """The k nearest stored vectors of each query vector (Q, D) or (D,), best first, by cosine; with
        `group`, the best of k different files."""
        queries = unit_rows(np.atleast_2d(np.asarray(vectors, dtype=np.float32)))
        if queries.shape[1] != self.store.dim:
            raise SearchError(f"query vectors of dimension {queries.shape[1]}; {self.store.path} holds "
                              f"{self.store.dim}-dimensional vectors")  # fmt: skip
        if k < 1:
            raise SearchError(f"k = {k}: ask for at least one match")
        file_of = self.store.file_of if group else None
        if self.mode == "approximate":
            scores, rows = self._approximate().search(queries, k, file_of)
        else:
            scores, rows = search_blocks(queries, self._blocks(), k, file_of)
        return [self._matches(s, r) for s, r in zip(scores, rows, strict=True)]

    def _approximate(self) -> ann.ApproximateIndex:
        if self._approx is None:
            self._approx = ann.load_or_build(self.store, self._note, self._progress)
        return self._approx

    def _blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        if self.store.rows * self.store.dim * 4 > IN_MEMORY_BYTES:
            yield from self.store.chunks()
            return
        if self._matrix is None:
            self._matrix = self.store.vectors()
        yield 0, self._matrix

    def _matches(self, scores: np.ndarray, rows: np.ndarray) -> list[Match]:
        out = []
        for score, row in zip(scores, rows, strict=True):
            if row < 0:
                break
            hit = self.store.hit(int(row))
            out.append(Match(len(out) + 1, hit.path, round(float(score), 6), hit.start, hit.end))
        return out

    # -- audio ---------------------------------------------------------------------------------------------

    def model(self, checkpoint: str | None = None, device: str = "cpu", precision: str = "fp32"):
        """The model that embeds queries as the store was made: the store's checkpoint, or `checkpoint`
        (a note when it is not the store's), with the store's dimension."""
        from sslam_core.models.factory import load_model

        settings = self.store.settings
        source = checkpoint or settings.get("checkpoint")
        if not source:
            raise SearchError(f"{self.store.path}: the store does not name its checkpoint; give --checkpoint")
        try:
            model = load_model(
                source, device=device, teacher=bool(settings.get("teacher")), precision=precision
            )
        except SslamError as err:
            if checkpoint is None:
                raise SearchError(f"{self.store.path} was extracted with {source}, which cannot be loaded "
                                  f"here ({err}); give --checkpoint") from None  # fmt: skip
            raise
        dim = getattr(getattr(model, "cfg", None), "embed_dim", None)
        if dim is not None and dim != self.store.dim:
            raise SearchError(f"{source} makes {dim}-dimensional vectors; {self.store.path} holds "
                              f"{self.store.dim}-dimensional ones")  # fmt: skip
        want, got = settings.get("checkpoint_sha256"), (model.checkpoint_info or {}).get("sha256")
        if want and got and want != got:
            if checkpoint is None:
                raise SearchError(f"{source} is not the checkpoint {self.store.path} was extracted with (its "
                                  "content differs); give --checkpoint to search with it anyway")  # fmt: skip
            self._note(f"note: {checkpoint} is not the checkpoint {self.store.path} was extracted with; "
                       "its vectors are compared with the store's as they are")  # fmt: skip
        return model

    def embed(
        self,
        sources: Sequence,
        model,
        names: Sequence[str] | None = None,
        device: str = "cpu",
        precision: str = "fp32",
        batch_size: int | None = None,
        workers: int | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> Iterator[tuple[str, np.ndarray | None, str | None]]:
        """(name, query vector or None, error) of each source, embedded with the store's settings."""
        from sslam_core.inference.embeddings import embed

        a = self.store.attrs
        norm = json.loads(a["normalization"]) if isinstance(a.get("normalization"), str) else None
        frames = self.granularity == "frame"
        records = embed(
            model,
            sources,
            granularity="frame" if frames else "clip",
            layer=None if int(a.get("layer", -1)) == -1 else int(a["layer"]),
            frame_hop=float(a["frame_hop"]) if frames and a.get("frame_hop") else None,
            names=names,
            stop=stop,
            target_length=int(a["target_length"]),
            hop=round(float(a["hop"]) * 100) if a.get("hop") else None,
            normalization=tuple(norm) if isinstance(norm, list) else (norm or "audioset"),
            device=device,
            precision=precision,
            batch_size=batch_size,
            workers=workers,
        )
        for rec in records:
            if rec.error is not None:
                yield rec.path, None, rec.error
            elif frames and rec.frame is not None and len(rec.frame):
                yield rec.path, rec.frame.mean(axis=0), None
            else:
                yield rec.path, rec.clip, None

    def search_audio(
        self, sources: Sequence, k: int = 10, group: bool = False, checkpoint: str | None = None, **options
    ) -> list[QueryResult]:
        """Each audio source (path, tar member, or (wave, sample_rate)) embedded as the store was made and
        searched; a source that cannot be decoded is a QueryResult with its error and no matches."""
        device, precision = options.get("device", "cpu"), options.get("precision", "fp32")
        model = self.model(checkpoint, device, precision)
        results = []
        for name, vector, error in self.embed(sources, model, **options):
            if error is not None:
                results.append(QueryResult(name, [], error))
            else:
                results.append(QueryResult(name, self.search(vector, k, group)[0]))
        return results


def _faiss_available() -> bool:
    return ann.available()


__all__ = ["Index", "Match", "QueryResult", "EXACT_BELOW", "SearchError"]
