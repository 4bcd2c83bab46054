"""The Hugging Face layout: a folder with `config.json` and `model.safetensors` under the EAT
remote-code names (`model.*`)."""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from sslam_core.data.labels import AUDIOSET_CLASSES
from sslam_core.models.checkpoint import (
    AUDIOSET_NORM,
    HEAD,
    Checkpoint,
    CheckpointError,
    config_from_state,
    labels_for,
    metadata,
    rename_in,
    rename_out,
    split_state,
    to_fp32,
    with_metadata,
)
from sslam_core.models.layouts.native import read_safetensors

HF_STEM = {
    "patch_embed.weight": "model.local_encoder.proj.weight",
    "patch_embed.bias": "model.local_encoder.proj.bias",
    "cls_token": "model.extra_tokens",
    "pos_embed": "model.fixed_positional_encoder.positions",
    "pre_norm.weight": "model.pre_norm.weight",
    "pre_norm.bias": "model.pre_norm.bias",
}

HF_DERIVED = ("hf_config",)


def read_hf(folder: Path) -> Checkpoint:
    weights = folder / "model.safetensors"
    try:
        hf_cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: cannot read ({e})") from None
    if not isinstance(hf_cfg, dict):
        raise CheckpointError(f"{folder / 'config.json'}: not a JSON object")
    tensors, _ = read_safetensors(weights)
    if HF_STEM["cls_token"] not in tensors:
        raise CheckpointError(f"{weights}: no EAT/SSLAM weights found (expected 'model.*' keys)")
    encoder = to_fp32(rename_in(tensors, HF_STEM, "model."), str(weights))
    head = to_fp32(
        {k[len("model.") :]: tensors[k] for k in ("model." + h for h in HEAD) if k in tensors}, str(weights)
    )
    state = {**{"encoder." + k: v for k, v in encoder.items()}, **head} if head else encoder
    config = config_from_state(state, hf_cfg.get("num_heads"), hf_cfg.get("norm_eps"))
    meta = hf_cfg.pop("sslam", None)
    ckpt = Checkpoint(
        config,
        state,
        labels=labels_for(config.num_classes),
        normalization=AUDIOSET_NORM,
        extra={"hf_config": hf_cfg},
        layout="hf",
    )
    return with_metadata(ckpt, meta, str(folder / "config.json"))


def hf_config(ckpt: Checkpoint) -> dict:
    """config.json in the field set of the EAT remote-code models on the Hugging Face Hub, plus our
    "sslam" block (labels, normalisation, training metadata). There is no `auto_map`: the folder does
    not ship the remote-code modules, and naming absent files would only make transformers fail later."""
    cfg = ckpt.config
    if cfg.num_classes and cfg.pool != "cls":
        raise CheckpointError(f"{ckpt.source}: the Hugging Face EAT layout has no mean-pooling classifier")
    return {
        "architectures": ["EATModel"],
        "model_type": "eat",
        "embed_dim": cfg.embed_dim,
        "depth": cfg.depth,
        "num_heads": cfg.num_heads,
        "patch_size": cfg.patch_size,
        "stride": cfg.patch_size,
        "in_chans": 1,
        "mel_bins": cfg.mel_bins,
        "max_length": cfg.max_length,
        "num_classes": cfg.num_classes or AUDIOSET_CLASSES,
        "model_variant": "finetune" if cfg.num_classes else "pretrain",
        "mlp_ratio": cfg.mlp_ratio,
        "qkv_bias": cfg.qkv_bias,
        "drop_rate": 0.0,
        "attn_drop_rate": 0.0,
        "activation_dropout": 0.0,
        "post_mlp_drop": 0.0,
        "start_drop_path_rate": 0.0,
        "end_drop_path_rate": 0.0,
        "layer_norm_first": False,
        "norm_eps": cfg.norm_eps,
        "norm_affine": True,
        "fixed_positions": True,
        "img_size": [1024, cfg.mel_bins],
        "torch_dtype": "float32",
        "transformers_version": "4.51.3",
        "sslam": metadata(ckpt, HF_DERIVED),
    }


def hf_tensors(ckpt: Checkpoint) -> dict[str, Tensor]:
    """The model weights under the Hugging Face EAT names."""
    encoder, head = split_state(ckpt.state)
    tensors = rename_out(encoder, HF_STEM, "model.")
    tensors.update({"model." + k: v for k, v in head.items()})
    return tensors
