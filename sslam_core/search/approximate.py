"""An approximate nearest-neighbour index of a store, kept beside it: faiss IVF with fp16 vectors.

Chosen by measurement (scripts/bench.py search): on 2 cores and 1M clustered 768-d vectors an inverted
file builds in about a minute and answers in well under a millisecond at recall@10 above 0.95, where
HNSW graphs (usearch, faiss) took 10 minutes or more to build and needed a wide search for the same
recall. The index is built on first use (`build`), with `nprobe` calibrated on the store itself: the
smallest number of lists probed that finds 97 % of the exact top 10 of a sample of stored vectors. Its
metadata records a fingerprint of the rows it holds (`EmbeddingStore.fingerprint`): an index whose rows
the store no longer holds is rebuilt, one whose store has grown is extended with the new rows.

faiss-cpu is the optional extra `search` (`pip install 'sslam[search]'`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sslam_core.runs.outputs import atomic_write
from sslam_core.search.exact import search_blocks
from sslam_core.search.store import EmbeddingStore, SearchError

RECALL_TARGET = 0.97  # nprobe is calibrated to find this share of the exact top 10 (the goal is 0.95)
CALIBRATION_QUERIES = 200
FORMAT = 1


def available() -> bool:
    """Whether faiss can be imported (the optional extra `search`)."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def index_paths(store: EmbeddingStore) -> tuple[Path, Path]:
    """The index file and its metadata beside the store, one pair per granularity."""
    base = store.path.with_name(f"{store.path.name}.{store.granularity}.faiss")
    return base, base.with_name(base.name + ".json")


def lists_for(rows: int) -> int:
    """Inverted lists for `rows` vectors: about 4 sqrt(rows), at least 1 and at most rows / 39."""
    return max(1, min(int(4 * math.sqrt(rows)), rows // 39 or 1))


class ApproximateIndex:
    """A faiss IVF index of a store's unit vectors (inner product = cosine) and its metadata."""

    def __init__(self, index, meta: dict):
        self.index, self.meta = index, meta
        self.index.nprobe = int(meta["nprobe"])

    @property
    def rows(self) -> int:
        return int(self.meta["rows"])

    def search(
        self, queries: np.ndarray, k: int, file_of: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scores and row ids (Q, k), as `exact.search_blocks` returns them, from the index; with
        `file_of`, the best row of k different files (more candidates are fetched until k files are
        found, or every candidate the probed lists hold)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if file_of is None:
            scores, ids = self.index.search(queries, k)
            return np.where(ids >= 0, scores, -np.inf).astype(np.float32), ids.astype(np.int64)
        out_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
        out_r = np.full((len(queries), k), -1, dtype=np.int64)
        for i, query in enumerate(queries):
            fetch = 8 * k
            while True:
                scores, ids = self.index.search(query[None], min(fetch, self.rows))
                valid = ids[0] >= 0
                s, r = scores[0][valid], ids[0][valid].astype(np.int64)
                _, first = np.unique(file_of(r), return_index=True)  # rows come best first
                chosen = np.sort(first)[:k]
                if len(chosen) >= k or fetch >= self.rows or valid.sum() < min(fetch, self.rows):
                    break
                fetch *= 4
            out_s[i, : len(chosen)], out_r[i, : len(chosen)] = s[chosen], r[chosen]
        return out_s, out_r


def load_or_build(
    store: EmbeddingStore,
    note: Callable[[str], None] = lambda text: None,
    progress: Callable[[int, str], Callable[[int], None]] | None = None,
) -> ApproximateIndex:
    """The index beside `store`: loaded when it holds the store's rows, extended when the store has grown
    since, built (or rebuilt, with a note saying why) otherwise. `progress(total, what)` returns a
    callback taking counts of rows done."""
    import faiss

    path, meta_path = index_paths(store)
    meta = _read_meta(meta_path)
    if meta is not None and path.is_file() and path.stat().st_size == meta.get("bytes"):
        if meta.get("format") == FORMAT and meta.get("rows", 0) <= store.rows:
            if store.fingerprint(meta["rows"]) == meta.get("fingerprint"):
                try:
                    index = faiss.read_index(str(path))
                except RuntimeError as err:
                    note(f"note: {path}: cannot be read ({str(err).splitlines()[0]}); rebuilding it")
                else:
                    if meta["rows"] < store.rows:
                        return _extend(store, ApproximateIndex(index, meta), note, progress)
                    return ApproximateIndex(index, meta)
            else:
                note(f"note: {path} was built from other vectors than {store.path} now holds (another "
                     "extraction, or another store's index); rebuilding it")  # fmt: skip
        else:
            note(
                f"note: {path} does not describe {store.path} (fewer rows, or another format); rebuilding it"
            )
    elif path.exists() or meta_path.exists():
        note(f"note: {path} is incomplete or was changed; rebuilding it")
    return _build(store, note, progress)


def _build(store, note, progress) -> ApproximateIndex:
    import faiss

    lists = lists_for(store.rows)
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(store.rows, size=min(store.rows, 39 * lists * 2), replace=False))
    note(f"building the approximate index of {store.rows} {store.granularity} vectors ({lists} lists)")
    quantizer = faiss.IndexFlatIP(store.dim)
    index = faiss.IndexIVFScalarQuantizer(
        quantizer, store.dim, lists, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
    )
    index.train(store.vectors(sample))
    _add(store, index, 0, progress, "indexing")
    meta = {"format": FORMAT, "kind": f"faiss IVF{lists},SQfp16", "faiss": faiss.__version__,
            "granularity": store.granularity, "dim": store.dim, "lists": lists}  # fmt: skip
    meta["nprobe"], meta["recall_at_10"] = calibrate(store, index, progress)
    return _save(store, index, meta)


def _extend(store, approx: ApproximateIndex, note, progress) -> ApproximateIndex:
    new = store.rows - approx.rows
    note(f"extending the approximate index of {store.path} with {new} new {store.granularity} vectors")
    _add(store, approx.index, approx.rows, progress, "extending the index")
    return _save(store, approx.index, dict(approx.meta))


def _add(store, index, start, progress, what) -> None:
    done = progress(store.rows - start, what) if progress else None
    for first, block in store.chunks(start):
        index.add_with_ids(block, np.arange(first, first + len(block), dtype=np.int64))
        if done:
            done(len(block))


def calibrate(store: EmbeddingStore, index, progress=None) -> tuple[int, float]:
    """The smallest nprobe (a power of two) whose top 10 holds `RECALL_TARGET` of the exact top 10, for a
    sample of the store's own vectors as queries, each left out of its own results (a query that finds
    itself would flatter the index), and the recall it reaches."""
    rng = np.random.default_rng(1)
    rows = np.sort(rng.choice(store.rows, size=min(store.rows, CALIBRATION_QUERIES), replace=False))
    queries = store.vectors(rows)
    done = progress(store.rows, "calibrating") if progress else None
    _, exact = search_blocks(queries, store.chunks(), 11, on_block=done)
    truth = [_others(found, row) for found, row in zip(exact, rows, strict=True)]
    nprobe, recall = 1, 0.0
    while True:
        index.nprobe = nprobe
        _, approx = index.search(queries, 11)
        hits = [len(set(_others(found, row)) & set(want)) / max(len(want), 1)
                for found, row, want in zip(approx, rows, truth, strict=True)]  # fmt: skip
        recall = float(np.mean(hits))
        if recall >= RECALL_TARGET or nprobe >= index.nlist:
            return nprobe, recall
        nprobe = min(nprobe * 2, index.nlist)


def _others(found: np.ndarray, row: int) -> list[int]:
    """The first 10 rows found other than the query's own (and the -1 of nothing found)."""
    return [int(r) for r in found if r >= 0 and r != row][:10]


def _save(store, index, meta) -> ApproximateIndex:
    import faiss

    path, meta_path = index_paths(store)
    try:
        atomic_write(path, lambda tmp: faiss.write_index(index, tmp))
    except RuntimeError as err:  # faiss reports a failed write as its own error
        raise SearchError(f"{path}: cannot write the index ({str(err).splitlines()[0]})") from None
    meta = {**meta, "rows": store.rows, "fingerprint": store.fingerprint(), "bytes": path.stat().st_size,
            "store": os.fspath(store.path.name)}  # fmt: skip
    text = json.dumps(meta, indent=2) + "\n"
    atomic_write(meta_path, lambda tmp: Path(tmp).write_text(text))
    return ApproximateIndex(index, meta)


def _read_meta(path: Path) -> dict | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


__all__ = ["ApproximateIndex", "load_or_build", "calibrate", "available", "index_paths", "RECALL_TARGET"]
