"""`sslam search` at scale: exact search, and the approximate index against it (build, memory, recall).

    python scripts/bench.py search [--vectors 1000000] [--exact-clips 100000] [--dim 768] [--store S.h5]

Writes a synthetic store of clustered unit vectors (`--vectors`, `--dim`; mixtures of `--centres`
Gaussians, queries drawn from the same mixture and not stored) in `sslam extract`'s layout, then:

- exact search over the first `--exact-clips` vectors (in memory), per query in a batch of queries and
  one query at a time: the baseline;
- the approximate index of all `--vectors`: build time (train, add, calibrate), the growth of the
  process's peak memory while building, the index file's size, the latency of one query at a time and
  recall@10 against the exact top 10 of the same queries, and the speed-up over exact search of the
  same store.

`--store S.h5` runs the same on a real store (queries: held-out rows are not available, so each query
is a stored vector left out of its own results). Targets on a 2-core machine: recall@10 >= 0.95 at
<= 10 ms per query for 1M vectors; exact search over 100,000 clips <= 50 ms per query.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from sslam_core.search import approximate
from sslam_core.search.exact import search_blocks
from sslam_core.search.index import Index
from sslam_core.search.store import EmbeddingStore, unit_rows

from .common import print_machine


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vectors", type=int, default=1_000_000, help="synthetic vectors (0: none)")
    parser.add_argument("--exact-clips", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--centres", type=int, default=2000, help="Gaussian clusters of the synthetic store")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--store", type=Path, default=None, help="also measure this real store")
    parser.add_argument(
        "--work", type=Path, default=None, help="folder for the synthetic store [a temporary one]"
    )


def synthetic_store(path: Path, n: int, dim: int, centres: int, queries: int) -> np.ndarray:
    """Write n clustered vectors as a clip store; return `queries` more from the same mixture."""
    rng = np.random.default_rng(0)
    c = rng.standard_normal((centres, dim)).astype(np.float32)
    with h5py.File(path, "w") as f:
        f.create_dataset(
            "paths", data=np.array([f"clip{i:07d}.wav" for i in range(n)], dtype=h5py.string_dtype())
        )
        f.create_dataset("duration", data=np.full(n, 10.0))
        data = f.create_dataset(
            "clip", shape=(n, dim), dtype=np.float32, chunks=(max(1, (1 << 20) // (4 * dim)), dim)
        )
        for s in range(0, n, 100_000):
            e = min(n, s + 100_000)
            data[s:e] = c[rng.integers(0, centres, e - s)] + 0.7 * rng.standard_normal(
                (e - s, dim), dtype=np.float32
            )
        f.attrs.update({"checkpoint": "synthetic", "layer": -1, "granularity": "clip"})
    return unit_rows(
        c[rng.integers(0, centres, queries)] + 0.7 * rng.standard_normal((queries, dim), dtype=np.float32)
    )


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def exact_baseline(store: Path, queries: np.ndarray, clips: int) -> dict:
    """Exact search over the first `clips` vectors held in memory: ms per query in a batch, and alone."""
    with EmbeddingStore(store) as s:
        matrix = unit_rows(s._data[:clips])  # noqa: SLF001 - the benchmark reads the rows directly
    start = time.perf_counter()
    search_blocks(queries, [(0, matrix)], 10)
    batched = (time.perf_counter() - start) / len(queries)
    start = time.perf_counter()
    for q in queries[:50]:
        search_blocks(q[None], [(0, matrix)], 10)
    alone = (time.perf_counter() - start) / min(50, len(queries))
    return {
        "clips": clips,
        "ms_per_query_batched": round(batched * 1e3, 2),
        "ms_per_query_alone": round(alone * 1e3, 2),
    }


def approximate_figures(store: Path, queries: np.ndarray | None) -> dict:
    """Build the index of `store` and measure it against exact search (see the module docstring)."""
    for old in approximate.index_paths(EmbeddingStore(store)):
        old.unlink(missing_ok=True)
    before = peak_rss_mib()
    start = time.perf_counter()
    with Index(store, approximate=True) as index:
        index.search(index.store.vectors(np.array([0])), 1)  # builds the index
        build = time.perf_counter() - start
        grown = peak_rss_mib() - before
        leave_out = queries is None
        if leave_out:
            rows = np.random.default_rng(3).choice(index.store.rows, 200, replace=False)
            queries = index.store.vectors(rows)
        approx = index._approximate()  # noqa: SLF001
        times, found = [], []
        for q in queries:
            t = time.perf_counter()
            _, r = approx.search(q[None], 11 if leave_out else 10)
            times.append(time.perf_counter() - t)
            found.append(r[0])
        start = time.perf_counter()
        _, truth = search_blocks(queries, index.store.chunks(), 11 if leave_out else 10)
        exact_ms = (time.perf_counter() - start) / len(queries) * 1e3
        if leave_out:
            found = [[x for x in f if x != row][:10] for f, row in zip(found, rows, strict=True)]
            truth = [[x for x in t if x != row][:10] for t, row in zip(truth, rows, strict=True)]
        recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]))
        path, meta_path = approximate.index_paths(index.store)
        meta = json.loads(meta_path.read_text())
        query_ms = float(np.mean(times) * 1e3)
        return {
            "vectors": index.store.rows, "dim": index.store.dim, "index": meta["kind"],
            "nprobe": meta["nprobe"], "build_s": round(build, 1),
            "build_peak_memory_growth_mib": round(grown), "index_mib": round(path.stat().st_size / 2**20),
            "ms_per_query": round(query_ms, 3), "p99_ms": round(float(np.percentile(times, 99) * 1e3), 3),
            "recall_at_10": round(recall, 4), "exact_ms_per_query_batched": round(exact_ms, 1),
            "speedup_over_exact": round(exact_ms / query_ms, 1),
        }  # fmt: skip


def run(args: argparse.Namespace) -> None:
    machine = print_machine()
    report: dict = {"machine": machine}
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        if args.vectors == 0:  # only the real store
            args.vectors = None
        store = Path(tmp) / "synthetic.h5"
        t = time.perf_counter()
        if args.vectors is None:
            return run_real(args, report)
        queries = synthetic_store(store, args.vectors, args.dim, args.centres, args.queries)
        print(
            f"wrote {args.vectors} x {args.dim} synthetic vectors in {time.perf_counter() - t:.0f} s",
            flush=True,
        )
        report["exact"] = exact_baseline(store, queries, min(args.exact_clips, args.vectors))
        print("exact:", json.dumps(report["exact"]), flush=True)
        report["approximate"] = approximate_figures(store, queries)
        print("approximate:", json.dumps(report["approximate"]), flush=True)
    run_real(args, report)


def run_real(args: argparse.Namespace, report: dict) -> None:
    """The real store's figures (with --store), then the whole report as one JSON line."""
    if args.store:
        report["real_store"] = approximate_figures(args.store, None)
        print("real store:", json.dumps(report["real_store"]), flush=True)
    print(json.dumps(report))
