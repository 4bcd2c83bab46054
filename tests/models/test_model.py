"""Encoder/Classifier numerics against the official outputs (tests/fixtures/checkpoints/expected.npz)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CHECKPOINTS as FIXTURES

from sslam_core.models.factory import load_model
from sslam_core.models.transformer import Classifier, Encoder, count_flops, preset

ATOL = 1e-4


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    with np.load(FIXTURES / "expected.npz") as data:
        return {k: torch.from_numpy(data[k]) for k in data.files}


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return load_model(FIXTURES / "tiny_pretrain.pt")


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    return load_model(FIXTURES / "tiny_finetuned.pt")


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= ATOL


@torch.no_grad()
def test_encoder_matches_official(encoder, expected):
    assert isinstance(encoder, Encoder) and not encoder.training
    close(encoder(expected["x1024"]), expected["pre_all_1024"])
    close(encoder(expected["x512"]), expected["pre_all_512"])


@torch.no_grad()
def test_every_layer_matches_official(encoder, expected):
    layers = encoder.all_layers(expected["x1024"])
    assert len(layers) == 2
    for k, out in enumerate(layers):
        close(out, expected["layers_1024"][:, k])
        close(encoder(expected["x1024"], layer=k + 1), expected["layers_1024"][:, k])
    close(encoder(expected["x1024"], layer=-1), expected["pre_all_1024"])
    close(encoder(expected["x1024"], layer=-2), expected["layers_1024"][:, 0])


@pytest.mark.parametrize("layer", [0, 3, -3])
def test_layer_out_of_range(encoder, expected, layer):
    with pytest.raises(ValueError, match="out of range"):
        encoder(expected["x512"], layer=layer)


@torch.no_grad()
def test_teacher_matches_official_ema(expected):
    teacher = load_model(FIXTURES / "tiny_pretrain.pt", teacher=True)
    close(teacher(expected["x1024"]), expected["ema_all_1024"])
    assert (teacher(expected["x1024"]) - expected["pre_all_1024"]).abs().max() > 0.1


@torch.no_grad()
def test_classifier_matches_official(classifier, expected):
    assert isinstance(classifier, Classifier)
    logits = classifier(expected["x1024"])
    close(logits, expected["ft_logits_1024"])
    close(torch.sigmoid(logits), expected["ft_probs_1024"])
    close(classifier(expected["x512"]), expected["ft_logits_512"])
    close(classifier.features(expected["x1024"]), expected["ft_all_1024"])
    close(classifier.classify(classifier.features(expected["x1024"])), expected["ft_logits_1024"])


def test_bad_input_shape(encoder):
    with pytest.raises(ValueError, match="multiple of 16"):
        encoder(torch.zeros(1, 1, 100, 128))
    with pytest.raises(ValueError, match="longer than"):
        encoder(torch.zeros(1, 1, 12304, 128))


def test_flops_of_vit_base():
    flops = count_flops(preset("base"), 1024)
    assert 2 * 86e6 * 513 < flops < 2 * 86e6 * 513 * 1.2  # ~2 x params x tokens, plus attention


@torch.no_grad()
def test_the_fp32_tail_runs_the_head_in_fp32(classifier):
    """Under a bf16 autocast with `fp32_tail` (as inference runs bf16), fc_norm and the head compute in
    fp32: the logits from given features are fp32's bits; without it the head is bf16."""
    from sslam_core.models.precision import fp32_tail

    features = torch.randn(2, 9, classifier.cfg.embed_dim, generator=torch.Generator().manual_seed(0))
    reference = classifier.classify(features)
    with torch.autocast("cpu", torch.bfloat16), fp32_tail():
        tail = classifier.classify(features)
    assert tail.dtype == torch.float32 and torch.equal(tail, reference)
    with torch.autocast("cpu", torch.bfloat16):
        assert classifier.classify(features).dtype == torch.bfloat16
