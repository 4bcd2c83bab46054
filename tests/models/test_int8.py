"""The int8 graph (sslam_core.models.int8): per-channel weights, per-token activation scales, the output
block in fp32, standard ONNX operators only, and outputs that do not depend on the batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ROOT

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from sslam_core.models import int8  # noqa: E402
from sslam_core.models.loading import read_checkpoint  # noqa: E402
from sslam_core.models.onnx_export import ExportError, export_checkpoint, quantize_int8  # noqa: E402
from sslam_core.models.onnx_runtime import open_session, run_session  # noqa: E402

FINETUNED = ROOT / "tests" / "fixtures" / "checkpoints" / "tiny_finetuned.pt"


@pytest.fixture(scope="module")
def fp32_graph() -> bytes:
    """The tiny 2-block tagger's fp32 export (logits and the last block's features)."""
    return export_checkpoint(read_checkpoint(FINETUNED)).data


def windows(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 96, 128, generator=torch.Generator().manual_seed(seed))


def test_weights_get_one_scale_per_output_channel():
    w = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    w *= np.arange(1, 9, dtype=np.float32)
    w[:, 3] = 0  # an all-zero column gets scale 1 and zeros, not a division by zero
    q, scale = int8.quantize_weights(w)
    assert q.dtype == np.int8 and scale.shape == (8,) and scale[3] == 1 and not q[:, 3].any()
    assert np.abs(q).max() == 127 and np.all(np.abs(q).max(axis=0)[[0, 1, 2, 4, 5, 6, 7]] == 127)
    assert np.abs(q * scale - w).max(axis=0)[0] <= scale[0] / 2 + 1e-7  # error within half a step


def test_the_output_block_stays_fp32_and_the_others_are_integer(fp32_graph):
    proto = quantize_int8(onnx.load_from_string(fp32_graph))
    onnx.checker.check_model(proto)
    nodes = list(proto.graph.node)
    assert {n.domain for n in nodes} == {""}  # standard operators: any ONNX runtime can run an export
    integer = [n for n in nodes if n.op_type == "MatMulInteger"]
    inits = {i.name for i in proto.graph.initializer}
    fp32_weights = [n for n in nodes if n.op_type == "MatMul" and n.input[1] in inits]
    assert len(integer) == 4  # block 0's four matrices; block 1, the output block, stays fp32
    assert {int8.block_index(n) for n in fp32_weights} == {1}
    assert len(fp32_weights) == 4 and any(n.op_type == "Gemm" for n in nodes)  # the head stays fp32


def test_close_to_fp32_and_the_same_bits_in_any_batch(fp32_graph):
    fp32 = open_session(fp32_graph)
    quant = open_session(quantize_int8(onnx.load_from_string(fp32_graph)).SerializeToString())
    x = windows(3)
    ref, got = run_session(fp32, x), run_session(quant, x)
    cos = torch.nn.functional.cosine_similarity(got["features"][:, 0], ref["features"][:, 0], dim=-1)
    assert cos.min() > 0.999 and (got["logits"] - ref["logits"]).abs().max() < 0.05
    assert not torch.equal(got["logits"], ref["logits"])  # it is quantised
    for i in range(3):  # one token's scale is its own: alone or beside others, the same bits
        alone = run_session(quant, x[i : i + 1])
        assert torch.equal(alone["logits"][0], got["logits"][i])
        assert torch.equal(alone["features"][0], got["features"][i])
    silent = run_session(quant, torch.zeros(1, 1, 96, 128))  # all-zero tokens: no division by zero
    assert torch.isfinite(silent["logits"]).all()


def test_a_graph_without_module_paths_is_one_error(fp32_graph):
    proto = onnx.load_from_string(fp32_graph)
    for node in proto.graph.node:
        del node.metadata_props[:]
    with pytest.raises(ExportError, match="cannot quantise to int8: the exported graph names no encoder"):
        quantize_int8(proto)


def test_a_one_block_graph_is_quantised_whole():
    pretrain = ROOT / "tests" / "fixtures" / "checkpoints" / "tiny_pretrain.pt"
    result = export_checkpoint(read_checkpoint(pretrain), layer=1, int8=True)
    proto = onnx.load_from_string(result.data)
    assert sum(n.op_type == "MatMulInteger" for n in proto.graph.node) == 4
    assert result.cosine["cls"] > 0.999


def test_an_int8_export_reports_its_steps():
    from sslam_core.models.onnx_export import EXPORT_STEPS, export_progress

    steps: list[str] = []
    with export_progress(steps.append):
        export_checkpoint(read_checkpoint(FINETUNED), int8=True)
    assert steps == list(EXPORT_STEPS)
    steps.clear()
    export_checkpoint(read_checkpoint(FINETUNED))  # outside the context: nobody is told
    with export_progress(steps.append):
        export_checkpoint(read_checkpoint(FINETUNED))
    assert steps == list(EXPORT_STEPS[:2])  # fp32: no quantising


def test_an_unwritable_cache_runs_the_model_made_without_making_it_twice(tmp_path, monkeypatch):
    from sslam_core.models.factory import load_model
    from sslam_core.models.onnx_export import EXPORT_STEPS, export_progress

    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("SSLAM_CACHE", str(blocker / "cache"))  # a real ENOTDIR on writing
    steps: list[str] = []
    with export_progress(steps.append):
        model = load_model(FINETUNED, precision="int8")
    assert steps == list(EXPORT_STEPS)  # exported and quantised once
    assert model.precision == "int8" and "not a directory" in model.uncached
    assert model.checkpoint_info["source"] == str(FINETUNED)
    monkeypatch.setenv("SSLAM_CACHE", str(tmp_path / "cache"))
    assert load_model(FINETUNED, precision="int8").uncached is None
