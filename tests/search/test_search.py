"""`sslam search` and `sslam_core.search`: exact search equal to brute force, the approximate index at the
recall target (built, reused, extended, rebuilt when stale), audio queries embedded with the store's
settings, and one line for each bad input."""

from __future__ import annotations

import builtins
import json
import shutil

import h5py
import numpy as np
import pytest
from conftest import DATA, TINY_PRETRAIN, sslam

from sslam_core.search import approximate
from sslam_core.search.exact import search_blocks
from sslam_core.search.index import Index
from sslam_core.search.store import EmbeddingStore, SearchError


def write_store(path, clip, frames=None, names=None, attrs=None):
    """A store in `sslam extract`'s documented layout (docs/guides/outputs.md): clip vectors, and frame
    vectors with their offsets and times when `frames` (one (S, D) array per file) is given."""
    names = names or [f"f{i:05d}.wav" for i in range(len(clip))]
    with h5py.File(path, "w") as f:
        f.create_dataset("paths", data=np.array(names, dtype=h5py.string_dtype()))
        f.create_dataset("duration", data=np.full(len(clip), 10.0))
        f.create_dataset("clip", data=np.asarray(clip, dtype=np.float32))
        if frames is not None:
            f.create_dataset("frame/data", data=np.concatenate(frames).astype(np.float32))
            f.create_dataset("frame/offsets", data=np.cumsum([0] + [len(x) for x in frames]))
            f.create_dataset("frame/times", data=np.concatenate([np.arange(len(x)) * 0.16 for x in frames]))
        for key, value in {"checkpoint": "none", "layer": -1, "granularity": "all", "frame_hop": 0.16,
                           **(attrs or {})}.items():  # fmt: skip
            f.attrs[key] = value
    return path


def clustered(n, d=32, centres=40, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d))
    return (c[rng.integers(0, centres, n)] + 0.5 * rng.standard_normal((n, d))).astype(np.float32)


def brute(queries, vectors, k):
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    scores = q @ v.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


# ---------------------------------------------------------------------------------------------------------
# Exact search


def test_exact_search_equals_brute_force_in_any_block_size(tmp_path):
    vectors = clustered(500)
    queries = clustered(7, seed=1)
    want_scores, want_rows = brute(queries, vectors, 10)
    with EmbeddingStore(write_store(tmp_path / "s.h5", vectors)) as store:
        for block in (13, 64, 500):
            scores, rows = search_blocks(queries / np.linalg.norm(queries, axis=1, keepdims=True),
                                         store.chunks(rows=block), 10)  # fmt: skip
            assert np.array_equal(rows, want_rows)
            np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    with Index(tmp_path / "s.h5") as index:
        assert index.mode == "exact" and index.granularity == "clip"
        matches = index.search(queries, k=10)
        assert [m.path for m in matches[0]] == [f"f{r:05d}.wav" for r in want_rows[0]]
        assert [m.rank for m in matches[0]] == list(range(1, 11))
        np.testing.assert_allclose([m.score for m in matches[3]], want_scores[3], atol=1e-5)
        assert len(index.search(queries[0], k=900)[0]) == 500  # never more than the store holds


def test_frame_store_gives_segments_and_group_keeps_the_best_of_each_file(tmp_path):
    rng = np.random.default_rng(2)
    frames = [rng.standard_normal((int(rng.integers(1, 30)), 16)).astype(np.float32) for _ in range(40)]
    path = write_store(tmp_path / "f.h5", [f.mean(axis=0) for f in frames], frames)
    flat = np.concatenate(frames)
    owner = np.repeat(np.arange(40), [len(f) for f in frames])
    query = rng.standard_normal((3, 16)).astype(np.float32)
    scores, rows = brute(query, flat, len(flat))
    with Index(path) as index:
        assert index.granularity == "frame"
        plain = index.search(query, k=5)[0]
        first = rows[0][0]
        own_first = np.flatnonzero(owner == owner[first])[0]
        assert plain[0].path == f"f{owner[first]:05d}.wav"
        assert plain[0].start == round(float(first - own_first) * 0.16, 6)
        assert plain[0].end == pytest.approx(plain[0].start + 0.16)
        grouped = index.search(query, k=8, group=True)
        for q in range(3):
            want_files, seen = [], set()
            for r in rows[q]:  # the best row of each file, files in order of their best row
                if owner[r] not in seen:
                    seen.add(owner[r])
                    want_files.append(owner[r])
            assert [m.path for m in grouped[q]] == [f"f{i:05d}.wav" for i in want_files[:8]]
            best = [
                scores[q][list(rows[q]).index(next(r for r in rows[q] if owner[r] == i))]
                for i in want_files[:8]
            ]
            np.testing.assert_allclose([m.score for m in grouped[q]], best, atol=1e-5)
    with Index(path, "clip") as index:  # the same store searched by files
        assert index.search(query, 2)[0][0].start is None


# ---------------------------------------------------------------------------------------------------------
# The approximate index


def test_approximate_index_reaches_the_recall_target_and_is_kept_extended_and_rebuilt(tmp_path):
    pytest.importorskip("faiss")
    drawn = clustered(20_100, d=48, centres=200)  # queries from the same distribution, not in the store
    vectors, queries = drawn[:20_000], drawn[20_000:]
    path = write_store(tmp_path / "big.h5", vectors)
    notes = []
    with Index(path, exact_below=1000, note=notes.append) as index:
        assert index.mode == "approximate"
        found = index.search(queries, k=10)
    _, truth = brute(queries, vectors, 10)
    recall = np.mean(
        [
            len({m.path for m in f} & {f"f{r:05d}.wav" for r in t}) / 10
            for f, t in zip(found, truth, strict=True)
        ]
    )
    assert recall >= 0.95
    index_file, meta_file = approximate.index_paths(EmbeddingStore(path))
    meta = json.loads(meta_file.read_text())
    assert (
        meta["rows"] == 20_000
        and meta["recall_at_10"] >= approximate.RECALL_TARGET
        and "building" in notes[0]
    )
    notes.clear()
    with Index(path, exact_below=1000, note=notes.append) as index:  # reused as it is
        again = index.search(queries, k=10)
    assert notes == [] and [[m.path for m in f] for f in again] == [[m.path for m in f] for f in found]
    grown = np.concatenate([vectors, clustered(500, d=48, centres=200, seed=9)])
    write_store(path, grown)  # the store grew (extract --resume of more files): the index is extended
    with Index(path, exact_below=1000, note=notes.append) as index:
        hit = index.search(grown[-1], k=1)[0][0]
    assert "extending" in notes[0] and hit.path == "f20499.wav" and hit.score == pytest.approx(1.0, abs=1e-3)
    assert json.loads(meta_file.read_text())["rows"] == 20_500
    notes.clear()
    other = write_store(tmp_path / "other.h5", clustered(20_500, d=48, centres=200, seed=11))
    shutil.copy(index_file, tmp_path / "other.h5.clip.faiss")  # another store's index beside it
    shutil.copy(meta_file, tmp_path / "other.h5.clip.faiss.json")
    with Index(other, exact_below=1000, note=notes.append) as index:
        index.search(queries[:1], k=3)
    assert "was built from other vectors" in notes[0] and "rebuilding" in notes[0]
    notes.clear()
    (tmp_path / "other.h5.clip.faiss").write_bytes(b"damaged")
    with Index(other, exact_below=1000, note=notes.append) as index:
        index.search(queries[:1], k=3)
    assert "incomplete or was changed" in notes[0]


def test_without_faiss_a_large_store_is_searched_exactly_with_a_note(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError("No module named 'faiss'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    vectors = clustered(300)
    path = write_store(tmp_path / "s.h5", vectors)
    notes = []
    with Index(path, exact_below=100, note=notes.append) as index:
        assert index.mode == "exact"
        assert index.search(vectors[7], k=1)[0][0].path == "f00007.wav"
    assert "faiss is not installed (pip install 'sslam[search]')" in notes[0]
    with pytest.raises(SearchError, match="needs faiss"):
        Index(path, approximate=True)


# ---------------------------------------------------------------------------------------------------------
# The command on real audio


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """FSDD digits extracted with the tiny checkpoint (clip and frame vectors); two copies of one file."""
    root = tmp_path_factory.mktemp("corpus")
    audio = root / "audio"
    shutil.copytree(DATA / "fsdd_mini", audio, ignore=shutil.ignore_patterns("*.csv"))
    sslam("extract", audio, "-o", root / "store.h5", "-c", TINY_PRETRAIN, "-g", "all", "--device", "cpu")
    return root


def test_search_command_finds_the_query_itself_first(corpus, tmp_path):
    query = corpus / "audio" / "1_jackson_0.wav"
    r = sslam(
        "search",
        query,
        "--index",
        corpus / "store.h5",
        "-g",
        "clip",
        "-k",
        "3",
        "-f",
        "json",
        "--device",
        "cpu",
    )
    line = json.loads(r.stdout)
    assert line["query"] == str(query) and [m["rank"] for m in line["matches"]] == [1, 2, 3]
    assert line["matches"][0]["path"] == "1_jackson_0.wav" and line["matches"][0]["score"] == pytest.approx(
        1.0, abs=1e-5
    )
    assert set(line["matches"][0]) == {"rank", "path", "score", "start", "end"}
    with Index(corpus / "store.h5", "clip") as index:  # the command's scores are the library's cosines
        with h5py.File(corpus / "store.h5") as f:
            vec = f["clip"][list(f["paths"].asstr()[()]).index("1_jackson_0.wav")]
        assert [m.path for m in index.search(vec, 3)[0]] == [m["path"] for m in line["matches"]]
    frames = sslam(
        "search", query, "--index", corpus / "store.h5", "--group", "-k", "4", "-f", "csv", "--device", "cpu"
    )
    rows = frames.stdout.splitlines()
    assert rows[0] == "query,rank,path,score,start,end" and len(rows) == 5
    assert len({row.split(",")[2] for row in rows[1:]}) == 4  # four different files
    assert all(float(row.split(",")[5]) > float(row.split(",")[4]) for row in rows[1:])
    table = sslam("search", query, "--index", corpus / "store.h5", "-k", "2", "--device", "cpu").stdout
    assert "rank" in table and "start" in table and str(query) in table
    sslam("search", query, "--index", corpus / "store.h5", "-o", tmp_path / "m.csv", "--device", "cpu")
    assert (tmp_path / "m.csv").read_text().splitlines()[0] == "query,rank,path,score,start,end"


def test_bad_queries_are_one_line_each_and_the_others_are_answered(corpus, tmp_path):
    broken = tmp_path / "broken [1].wav"
    broken.write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage")
    good = corpus / "audio" / "2_george_1.wav"
    out = tmp_path / "m.jsonl"
    r = sslam(
        "search",
        broken,
        good,
        "--index",
        corpus / "store.h5",
        "-o",
        out,
        "-f",
        "json",
        "--device",
        "cpu",
        code=1,
    )
    skipped = [line for line in r.stderr.splitlines() if line.startswith("skipped:")]
    assert len(skipped) == 1 and "broken [1].wav" in skipped[0]
    assert [json.loads(line)["query"] for line in out.read_text().splitlines()] == [str(good)]
    again = sslam("search", good, "--index", corpus / "store.h5", "-o", out, "--device", "cpu", code=2)
    assert "--overwrite" in again.stderr  # no silent replacement
    r = sslam("search", broken, "--index", corpus / "store.h5", "--device", "cpu", code=2)
    assert "none of the 1 queries could be answered" in r.stderr


def test_bad_stores_are_one_line_each(corpus, tmp_path):
    good = corpus / "audio" / "0_george_0.wav"
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.zeros(3)
    clip_only = write_store(tmp_path / "clip.h5", clustered(4, d=64))
    empty = write_store(tmp_path / "empty.h5", np.zeros((0, 64)), names=[])
    (tmp_path / "unfinished.h5.parts").mkdir()
    for store, message in [
        (text, "notes.h5: not an HDF5 file"),
        (other, "other.h5: an HDF5 file, but not an embedding store of `sslam extract`"),
        (tmp_path / "unfinished.h5", "not finished"),
        (tmp_path / "missing.h5", "missing.h5: no such file"),
        (empty, "the store holds no clip vectors"),
    ]:
        r = sslam("search", good, "--index", store, "--device", "cpu", code=2)
        assert message in r.stderr, (store, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
    r = sslam("search", good, "--index", clip_only, "-g", "frame", "--device", "cpu", code=2)
    assert "holds no frame vectors" in r.stderr
    r = sslam("search", good, "--index", clip_only, "--device", "cpu", code=2)  # checkpoint "none"
    assert "was extracted with none, which cannot be loaded here" in r.stderr and "--checkpoint" in r.stderr


def test_checkpoint_checks_query_store_and_export(corpus, tmp_path):
    store = corpus / "store.h5"
    good = corpus / "audio" / "0_george_0.wav"
    wrong_dim = write_store(tmp_path / "wide.h5", clustered(4, d=40), attrs={"checkpoint": TINY_PRETRAIN})
    r = sslam("search", good, "--index", wrong_dim, "--device", "cpu", code=2)
    assert "makes 64-dimensional vectors" in r.stderr or "-dimensional vectors;" in r.stderr
    q = sslam("search", "--query-store", store, "--index", store, "-g", "clip", "-k", "1", "-f", "json")
    lines = [json.loads(line) for line in q.stdout.splitlines()]
    assert len(lines) == 12 and all(line["matches"][0]["path"] == line["query"] for line in lines)
    export = tmp_path / "segments"
    sslam("search", good, "--index", store, "-k", "2", "--group", "--export", export, "--audio-root",
          corpus / "audio", "--device", "cpu")  # fmt: skip
    written = sorted(export.iterdir())
    assert len(written) == 2 and all(p.suffix == ".wav" for p in written)
    import soundfile as sf

    info = sf.info(written[0])
    assert info.samplerate == 16000 and 0 < info.duration <= 2.0 + 0.16 + 1e-3
    r = sslam("search", good, "--index", store, "-k", "2", "--group", "--export", export, "--audio-root",
              corpus / "audio", "--device", "cpu", code=2)  # fmt: skip
    assert "pass --overwrite" in r.stderr
    r = sslam("search", good, "--index", store, "-k", "1", "-g", "clip", "--export", tmp_path / "other",
              "--device", "cpu", code=1)  # fmt: skip
    assert "give --audio-root" in r.stderr and "exported 0 segment(s)" in r.stderr
