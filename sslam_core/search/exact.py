"""Exact cosine search: every stored vector scored against every query, a block of rows at a time.

Top-k over rows, or with `group` over files: the best row of each file (one segment per file), which a
frame store needs to return k different files. Memory is one block of rows and the (queries, k) best.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

BLOCK_ROWS = 65536  # rows scored at once: 192 MiB of 768-d float32 vectors


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k highest scores of each row, best first (ties by index)."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    picked = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -picked), axis=1)
    return np.take_along_axis(part, order, axis=1)


def merge(best: tuple[np.ndarray, np.ndarray], new: tuple[np.ndarray, np.ndarray], k: int):
    """The k best of two (scores, ids) sets of each query."""
    scores = np.concatenate([best[0], new[0]], axis=1)
    ids = np.concatenate([best[1], new[1]], axis=1)
    keep = top_k(np.where(np.isfinite(scores), scores, -np.inf), k)
    return np.take_along_axis(scores, keep, axis=1), np.take_along_axis(ids, keep, axis=1)


def search_blocks(
    queries: np.ndarray,
    blocks: Iterable[tuple[int, np.ndarray]],
    k: int,
    file_of: Callable[[np.ndarray], np.ndarray] | None = None,
    on_block: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Scores (Q, k) and row ids (Q, k) of the k nearest rows of each unit query, best first, over
    (first row, unit vectors) blocks. With `file_of` (row -> file), the rows are the best of k different
    files. Fewer than k found: the rest is -inf and -1."""
    q = len(queries)
    best = (np.full((q, 0), -np.inf, dtype=np.float32), np.zeros((q, 0), dtype=np.int64))
    for first, block in blocks:
        scores = queries @ block.T  # (Q, rows)
        rows = np.arange(first, first + block.shape[0])
        if file_of is None:
            keep = top_k(scores, k)
            new = (np.take_along_axis(scores, keep, axis=1), rows[keep])
            best = merge(best, new, k)
        else:
            best = _merge_files(best, scores, rows, file_of(rows), k, file_of)
        if on_block is not None:
            on_block(block.shape[0])
    if best[0].shape[1] < k:
        pad = k - best[0].shape[1]
        best = (np.pad(best[0], ((0, 0), (0, pad)), constant_values=-np.inf),
                np.pad(best[1], ((0, 0), (0, pad)), constant_values=-1))  # fmt: skip
    return best


def _merge_files(best, scores, rows, files, k, file_of):
    """Fold a block into the best rows of k different files: each file's best row in the block (a file's
    rows are contiguous), then per query the k best files of the kept rows and the block's."""
    starts = np.flatnonzero(np.r_[True, files[1:] != files[:-1]])
    per_file = np.maximum.reduceat(scores, starts, axis=1)  # (Q, files in block)
    arg = np.empty_like(per_file, dtype=np.int64)
    bounds = np.r_[starts, len(rows)]
    for j in range(len(starts)):  # the row of each file's maximum
        arg[:, j] = rows[bounds[j] + np.argmax(scores[:, bounds[j] : bounds[j + 1]], axis=1)]
    all_scores = np.concatenate([best[0], per_file], axis=1)
    all_rows = np.concatenate([best[1], arg], axis=1)
    all_files = file_of(np.where(all_rows >= 0, all_rows, 0))
    out_s = np.full((len(scores), k), -np.inf, dtype=np.float32)
    out_r = np.full((len(scores), k), -1, dtype=np.int64)
    for i in range(len(scores)):  # a file seen in an earlier block may be seen again: keep its best row
        order = np.lexsort((all_rows[i], -all_scores[i]))
        _, first = np.unique(all_files[i][order], return_index=True)
        chosen = order[np.sort(first)][:k]
        out_s[i, : len(chosen)], out_r[i, : len(chosen)] = all_scores[i][chosen], all_rows[i][chosen]
    return out_s, out_r


__all__ = ["search_blocks", "top_k", "merge", "BLOCK_ROWS"]
