"""The GPU path, where a GPU is present (skipped elsewhere; `scripts/gpu_check.py` runs the full check).

These failed or could not run before the first GPU session: stage-1 and stage-2 pre-training steps
under bf16 autocast (the decoder's grid took the bf16 patch tokens' dtype while the post-LN blocks
return fp32, and `scatter` refused the mix), and CUDA fp32 inference equal to the CPU's.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import DATA

from sslam_core.inference.embeddings import embed
from sslam_core.models.transformer import Encoder, preset
from sslam_core.training.objective import PretrainingModel
from sslam_core.training.pretraining import PretrainTask, objective_config, resolve_settings, train_config
from sslam_core.training.trainer import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class _Batches:
    def __init__(self, batch: torch.Tensor):
        self.batch = batch

    def __call__(self, epoch_seed, rank, world_size, start_position):
        while True:
            yield {"source": self.batch}


@pytest.mark.parametrize("stage", ["eat", "sslam"])
def test_pretraining_steps_in_bf16_on_cuda(stage, tmp_path):
    device = torch.device("cuda")
    settings = resolve_settings(
        {"stage": stage, "steps": 4, "batch_size": 2, "target_length": 256, "device": "cuda"}
    )
    torch.manual_seed(0)
    model = PretrainingModel(preset("tiny"), objective_config(settings))
    batch = torch.randn(2, 1, 256, 128, generator=torch.Generator().manual_seed(0)).to(device)
    config = train_config(settings, device)
    assert config.precision == "bf16"
    config.out_dir, config.progress, config.log_every, config.warmup = str(tmp_path / "run"), False, 1, 0
    summary = train(PretrainTask(model, _Batches(batch), settings), config)
    assert summary["steps"] == 4 and math.isfinite(summary["last"]["loss"])


def test_cuda_fp32_inference_equals_cpu():
    torch.manual_seed(0)
    model = Encoder(preset("tiny")).eval()
    files = [str(DATA / "real_32k.wav"), str(DATA / "robin.ogg")]
    cpu = list(embed(model, files, granularity="patch", device="cpu"))
    gpu = list(embed(model.to("cuda"), files, granularity="patch", device="cuda", precision="fp32"))
    for a, b in zip(cpu, gpu, strict=True):
        assert np.abs(a.clip - b.clip).max() <= 1e-3
        assert np.abs(a.patch - b.patch).max() <= 1e-3
