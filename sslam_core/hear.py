"""HEAR 2021 API (https://hearbenchmark.com): `load_model`, `get_scene_embeddings`,
`get_timestamp_embeddings`. Scene embeddings are CLS vectors (the mean over 10.24 s windows for
longer audio); timestamp embeddings are one vector per 160 ms step every `frame_hop` seconds (40 ms
by default, within the 50 ms HEAR suggests, from four passes shifted by 40 ms), stamped at the
step's centre in ms."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from sslam_core.audio import constants
from sslam_core.audio.constants import STEP_SECONDS
from sslam_core.inference.embeddings import embed
from sslam_core.models.factory import load_model as _load
from sslam_core.models.hub import DEFAULT_ENCODER

SAMPLE_RATE = constants.SAMPLE_RATE  # the HEAR API reads the model's rate here


def load_model(
    model_file_path: str = "", device: str = "cpu", layer: int | None = None, frame_hop: float = 0.04
) -> nn.Module:
    """Load a checkpoint (path or hub id; default the SSLAM pre-trained encoder) for the HEAR API;
    `frame_hop` is the timestamp embeddings' hop in seconds (0.16, 0.08, 0.04, 0.02 or 0.01)."""
    model = _load(model_file_path or DEFAULT_ENCODER, device=device)
    dim = model.cfg.embed_dim
    model.sample_rate = SAMPLE_RATE
    model.scene_embedding_size = dim
    model.timestamp_embedding_size = dim
    model.hear_layer = layer
    model.hear_frame_hop = frame_hop
    return model


def _records(audio: Tensor, model: nn.Module, granularity: str):
    device = next(model.parameters()).device
    sources = [(wave.detach().cpu().float(), SAMPLE_RATE) for wave in audio]
    hop = getattr(model, "hear_frame_hop", None) if granularity == "frame" else None
    records = list(
        embed(model, sources, granularity=granularity, layer=model.hear_layer, device=device, frame_hop=hop)
    )
    for rec in records:
        if rec.error:
            raise ValueError(rec.error)
    return records


def get_scene_embeddings(audio: Tensor, model: nn.Module) -> Tensor:
    """(n_sounds, n_samples) at 16 kHz -> (n_sounds, D)."""
    records = _records(audio, model, "clip")
    return torch.from_numpy(np.stack([r.clip for r in records]))


def get_timestamp_embeddings(audio: Tensor, model: nn.Module) -> tuple[Tensor, Tensor]:
    """(n_sounds, n_samples) -> embeddings (n_sounds, n_steps, D) and timestamps (n_sounds, n_steps) in ms."""
    records = _records(audio, model, "frame")
    centres = [r.frame_times + STEP_SECONDS / 2 for r in records]
    # steps whose centre lies past the end of the audio are left out: a timestamp never exceeds it
    inside = [c <= r.duration + 1e-9 for c, r in zip(centres, records, strict=True)]
    n = min(int(k.sum()) for k in inside)  # the sounds of a batch have one length, so one count
    emb = torch.from_numpy(np.stack([r.frame[k][:n] for r, k in zip(records, inside, strict=True)]))
    times = torch.from_numpy(np.stack([c[k][:n] * 1000.0 for c, k in zip(centres, inside, strict=True)]))
    return emb, times.float()
