"""The official fairseq layout (`.pt` pickles of data2vec_multi pre-training and
mae_image_classification fine-tuning runs), read through the restricted unpickler and written back."""

from __future__ import annotations

import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from sslam_core.audio.constants import NORMALIZATION
from sslam_core.models import safe_pickle
from sslam_core.models.checkpoint import (
    AUDIOSET_NORM,
    HEAD,
    Checkpoint,
    CheckpointError,
    config_from_state,
    jsonable,
    labels_for,
    metadata,
    rename_in,
    rename_out,
    split_state,
    to_fp32,
    with_metadata,
)

TASK_NORMS = {"esc50_eval": NORMALIZATION["esc50"], "spcv2_eval": NORMALIZATION["spc2"]}  # fairseq task flags

IMAGE_PREFIX = "modality_encoders.IMAGE."

DECODER_PREFIX = IMAGE_PREFIX + "decoder."

# Our encoder names -> fairseq / HF names for everything outside `blocks.*` (which keep their names).
FAIRSEQ_STEM = {
    "patch_embed.weight": IMAGE_PREFIX + "local_encoder.proj.weight",
    "patch_embed.bias": IMAGE_PREFIX + "local_encoder.proj.bias",
    "cls_token": IMAGE_PREFIX + "extra_tokens",
    "pos_embed": IMAGE_PREFIX + "fixed_positional_encoder.positions",
    "pre_norm.weight": IMAGE_PREFIX + "context_encoder.norm.weight",
    "pre_norm.bias": IMAGE_PREFIX + "context_encoder.norm.bias",
}

# Keys of `Checkpoint.extra` that a layout derives from its own fields, so its "sslam" block omits them.
FAIRSEQ_DERIVED = ("fairseq_model_cfg", "fairseq_task_cfg", "num_updates")


def torch_load(path: Path) -> Any:
    """`torch.load` through the restricted unpickler (memory-mapped for zip-format files)."""
    is_zip = zipfile.is_zipfile(path)
    try:
        return torch.load(
            path, map_location="cpu", pickle_module=safe_pickle, weights_only=False, mmap=is_zip
        )
    except Exception as e:
        refused = safe_pickle.refused_global(e)
        if refused:
            raise CheckpointError(
                f"{path}: checkpoint references {refused}, which no model file needs; refusing to load it"
            ) from None
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({reason[:200]})") from None


def read_fairseq(path: Path) -> Checkpoint:
    obj = torch_load(path)
    weights = obj.get("model") if isinstance(obj, dict) else None
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path}: not a fairseq checkpoint (no 'model' state dict)")
    cfg = safe_pickle.to_plain(obj.get("cfg"))
    if not isinstance(cfg, dict):
        args = obj.get("args")
        cfg = {"model": dict(args), "task": dict(args)} if isinstance(args, dict) else {}
    model_cfg = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    task_cfg = cfg.get("task") if isinstance(cfg.get("task"), dict) else {}
    history = obj.get("optimizer_history")
    extra: dict[str, Any] = {"fairseq_model_cfg": model_cfg, "fairseq_task_cfg": task_cfg}
    if isinstance(history, list) and history and isinstance(history[-1], dict):
        extra["num_updates"] = history[-1].get("num_updates")
    norm = next((v for k, v in TASK_NORMS.items() if task_cfg.get(k)), AUDIOSET_NORM)
    where = str(path)

    if any(k.startswith("model." + IMAGE_PREFIX) for k in weights):
        inner = {k[len("model.") :]: v for k, v in weights.items() if k.startswith("model.")}
        pretrain_cfg = model_cfg.get("pretrained_model_args") or {}
        pretrain_model = pretrain_cfg.get("model") if isinstance(pretrain_cfg, dict) else None
        pretrain_model = pretrain_model if isinstance(pretrain_model, dict) else {}
        encoder = to_fp32(rename_in(inner, FAIRSEQ_STEM, ""), where)
        state = {"encoder." + k: v for k, v in encoder.items()}
        state.update(to_fp32({k: weights[k] for k in HEAD if k in weights}, where))
        heads = model_cfg.get("num_heads") or pretrain_model.get("num_heads")
        eps = model_cfg.get("norm_eps") or pretrain_model.get("norm_eps")
        config = replace(config_from_state(state, heads, eps), pool=pool_from_fairseq(model_cfg, where))
        task_state = obj.get("task_state") if isinstance(obj.get("task_state"), dict) else {}
        labels = labels_for(config.num_classes, task_state.get("labels"))
        ckpt = Checkpoint(
            config, state, labels=labels, normalization=norm, extra=jsonable(extra), layout="fairseq"
        )
        return with_metadata(ckpt, obj.get("sslam"), where)

    if IMAGE_PREFIX + "extra_tokens" not in weights:
        raise CheckpointError(
            f"{where}: no SSLAM/EAT encoder weights found (expected '{IMAGE_PREFIX}*' keys)"
        )
    state = to_fp32(rename_in(weights, FAIRSEQ_STEM, ""), where)
    decoder_weights = {
        k[len(DECODER_PREFIX) :]: v for k, v in weights.items() if k.startswith(DECODER_PREFIX)
    }
    decoder = to_fp32(decoder_weights, where)
    ema = weights.get("_ema")
    teacher = to_fp32(rename_in(ema, FAIRSEQ_STEM, ""), where) if isinstance(ema, dict) else None
    config = config_from_state(state, model_cfg.get("num_heads"), model_cfg.get("norm_eps"))
    ckpt = Checkpoint(
        config,
        state,
        teacher=teacher or None,
        decoder=decoder or None,
        normalization=norm,
        extra=jsonable(extra),
        layout="fairseq",
    )
    return with_metadata(ckpt, obj.get("sslam"), where)


PREDICTION_MODES = {"CLS_TOKEN": "cls", "MEAN_POOLING": "mean"}


def pool_from_fairseq(model_cfg: dict, where: str) -> str:
    """The classifier's pooling from fairseq's `prediction_mode` (released models use CLS_TOKEN)."""
    mode = str(model_cfg.get("prediction_mode") or "CLS_TOKEN").rsplit(".", 1)[-1]
    if mode not in PREDICTION_MODES:
        raise CheckpointError(
            f"{where}: prediction_mode {mode} is not supported (only CLS_TOKEN, MEAN_POOLING)"
        )
    return PREDICTION_MODES[mode]


def fairseq_pretrain_cfg(ckpt: Checkpoint) -> dict:
    """The `cfg['model']` section of a data2vec_multi pre-training run, sized from the config."""
    cfg = ckpt.config
    known = ckpt.extra.get("fairseq_model_cfg") or {}
    if known.get("_name") == "mae_image_classification":
        known = (known.get("pretrained_model_args") or {}).get("model") or {}
    decoder_dim = ckpt.decoder["proj.weight"].shape[1] if ckpt.decoder else cfg.embed_dim
    sizes = {
        "depth": cfg.depth,
        "embed_dim": cfg.embed_dim,
        "num_heads": cfg.num_heads,
        "mlp_ratio": cfg.mlp_ratio,
    }
    image = {
        **((known.get("modalities") or {}).get("image") or {}),
        "type": "IMAGE",
        "prenet_depth": 0,
        "num_extra_tokens": 1,
        "model_depth": cfg.depth,
        "in_chans": 1,
        "patch_size": cfg.patch_size,
        "embed_dim": cfg.embed_dim,
        "fixed_positions": True,
        "max_length": cfg.max_length,
    }
    image["decoder"] = {
        "decoder_dim": decoder_dim,
        "decoder_groups": 16,
        "decoder_kernel": 3,
        "decoder_layers": 6,
        "decoder_residual": True,
        "projection_layers": 1,
        **(image.get("decoder") or {}),
    }
    image["decoder"]["decoder_dim"] = decoder_dim
    return {
        **known,
        "_name": "data2vec_multi",
        **sizes,
        "norm_eps": cfg.norm_eps,
        "norm_affine": True,
        "layer_norm_first": False,
        "supported_modality": "IMAGE",
        "modalities": {"_name": None, "image": image},
    }


def fairseq_container(ckpt: Checkpoint) -> dict:
    """The official fairseq checkpoint dict (plain types only) holding this checkpoint's weights, plus
    a "sslam" key with the labels, normalisation and training metadata (fairseq ignores it)."""
    encoder, head = split_state(ckpt.state)
    task = dict(ckpt.extra.get("fairseq_task_cfg") or {})
    if isinstance(ckpt.extra.get("target_length"), int):
        task["target_length"] = ckpt.extra["target_length"]
    pretrain = fairseq_pretrain_cfg(ckpt)
    if ckpt.config.num_classes:
        weights = {"model." + k: v for k, v in rename_out(encoder, FAIRSEQ_STEM, "").items()}
        weights.update(head)
        model_cfg = {
            **(ckpt.extra.get("fairseq_model_cfg") or {}),
            "_name": "mae_image_classification",
            "num_classes": ckpt.config.num_classes,
            "use_fc_norm": True,
            "prediction_mode": {v: k for k, v in PREDICTION_MODES.items()}[ckpt.config.pool],
            "pretrained_model_args": {"model": pretrain, "task": {"_name": "mae_image_pretraining"}},
        }
        task = {"_name": "mae_image_classification", **task}
        labels = {mid: str(i) for i, (mid, _) in enumerate(ckpt.labels or [])}
        task_state = {"labels": labels} if labels else {}
    else:
        weights = rename_out(encoder, FAIRSEQ_STEM, "")
        weights.update({DECODER_PREFIX + k: v for k, v in (ckpt.decoder or {}).items()})
        if ckpt.teacher is not None:
            weights["_ema"] = rename_out(ckpt.teacher, FAIRSEQ_STEM, "")
        model_cfg = pretrain
        task = {"_name": "mae_image_pretraining", **task}
        task_state = {}
    return {
        "args": None,
        "cfg": {"model": model_cfg, "task": task},
        "model": weights,
        "criterion": None,
        "optimizer_history": [
            {
                "criterion_name": "ModelCriterion",
                "optimizer_name": "FairseqAdam",
                "lr_scheduler_state": {},
                "num_updates": int(ckpt.extra.get("num_updates") or 0),
            }
        ],
        "task_state": task_state,
        "extra_state": {},
        "last_optimizer_state": None,
        "sslam": metadata(ckpt, FAIRSEQ_DERIVED),
    }
