"""The pre-training objective of EAT (stage 1) and SSLAM (stage 2): student, decoder, EMA teacher, losses.

data2vec 2.0 on log-mel patches (spec §4). The EMA teacher sees the whole clip and gives per-patch
targets (instance-normed MLP outputs of its blocks, averaged, layer-normed); the student sees a few
visible islands per clone, and a small convolutional decoder predicts the targets of the masked
patches. The student's CLS output regresses the mean patch target. SSLAM adds partially mixed
clips and the Source Retention Loss, whose target keeps each clip's own content audible.

Ablations of stage 2 (defaults = the release): `mix="none"` trains on the clean batch only (the "same
training without mixtures" control), `utterance_target` picks the CLS target (the last teacher block, as
the release's stage 2, or the top-K average of stage 1), `mix_partner="random"` pairs clips by a random
derangement instead of clip i with clip i-1, `srl_weight=0` drops the Source Retention term.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslam_core.errors import OptionError
from sslam_core.models.transformer import Encoder, ModelConfig
from sslam_core.training.masking import block_mask, visible_indices
from sslam_core.training.mixing import (
    choose_windows,
    partial_mix,
    random_partners,
    roll_partners,
    window_frames,
)
from sslam_core.training.transfer import to_device

STAGES = ("eat", "sslam")
MIX_MODES = ("partial", "none")
MIX_PARTNERS = ("roll", "random")
UTTERANCE_TARGETS = ("average", "last")


@dataclass
class ObjectiveConfig:
    """Hyper-parameters of the pre-training objective; defaults are the release values (spec §4)."""

    stage: str = "eat"  # "eat" = stage 1, "sslam" = stage 2 (mixtures + Source Retention Loss)
    clone_batch: int | None = None  # masked copies per clip; None = 16 for EAT, 8 for SSLAM
    mask_prob: float = 0.8
    mask_length: int = 5
    mask_adjust: float = 0.07
    average_top_k: int = 12
    mask_noise_std: float = 0.01
    cls_loss: float = 1.0
    srl_weight: float = 2.0
    window: int = 240
    num_windows: int = 2
    ema_decay: float = 0.9998
    ema_end_decay: float = 0.99999
    ema_anneal_end_step: int = 100_000
    decoder_layers: int = 6
    decoder_groups: int = 16
    mix: str = "partial"  # SSLAM: "partial" = the release's mixtures, "none" = the clean batch only
    mix_partner: str = "roll"  # SSLAM: "roll" = clip i with clip i-1, "random" = a random derangement
    utterance_target: str | None = None  # CLS target: "average" (top-K) or "last" block; None = stage's

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("stage", self.stage, STAGES),
            ("mix", self.mix, MIX_MODES),
            ("mix_partner", self.mix_partner, MIX_PARTNERS),
            ("utterance_target", self.utterance_target, (None, *UTTERANCE_TARGETS)),
        ):
            if value not in allowed:
                choices = ", ".join(a for a in allowed if a is not None)
                raise OptionError(f"unknown {name} {value!r}; choose from {choices}")
        if self.utterance_target is None:
            self.utterance_target = "average" if self.stage == "eat" else "last"
        if self.clone_batch is None:
            self.clone_batch = 16 if self.stage == "eat" else 8
        if self.clone_batch < 1:
            raise OptionError(f"clone_batch must be >= 1, got {self.clone_batch}")


def ema_decay_at(step: int, cfg: ObjectiveConfig) -> float:
    """Teacher decay at `step`: linear from ema_decay to ema_end_decay over the anneal steps, then flat."""
    if step >= cfg.ema_anneal_end_step:
        return cfg.ema_end_decay
    return cfg.ema_end_decay - (cfg.ema_end_decay - cfg.ema_decay) * (1 - step / cfg.ema_anneal_end_step)


class ChannelNorm(nn.Module):
    """LayerNorm over the channel axis of (B, C, H, W), no affine parameters."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.transpose(1, -1), x.shape[1:2], eps=self.eps).transpose(1, -1)


class Decoder(nn.Module):
    """Convolutional decoder over the (time, frequency) patch grid; parameter names match the release."""

    def __init__(self, dim: int, layers: int = 6, groups: int = 16, kernel: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=groups), ChannelNorm(), nn.GELU()
            )
            for _ in range(layers)
        )
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens: Tensor, freq_patches: int) -> Tensor:
        """(B, N, D) grid tokens (visible outputs + mask noise) -> predictions (B, N, D)."""
        B, N, D = tokens.shape
        x = tokens.transpose(1, 2).reshape(B, D, N // freq_patches, freq_patches)
        for block in self.blocks:
            x = x + block(x)
        return self.proj(x.reshape(B, D, N).transpose(1, 2))


def regression_targets(ffn_outputs: list[Tensor], top_k: int) -> Tensor:
    """data2vec 2.0 targets from per-block MLP outputs (B, N, D): instance norm over tokens per layer,
    mean of the top `top_k` layers, then layer norm over channels (both eps 1e-5, no affine)."""
    layers = ffn_outputs[-top_k:]
    normed = [F.instance_norm(y.float().transpose(1, 2)).transpose(1, 2) for y in layers]
    y = sum(normed) / len(normed)
    return F.layer_norm(y, y.shape[-1:])


def row_tokens(time_rows: Tensor, freq_patches: int) -> Tensor:
    """Token indices (time-major) of whole rows of patches."""
    return (time_rows[:, None] * freq_patches + torch.arange(freq_patches, device=time_rows.device)).flatten()


def source_retention_target(
    own: Tensor,
    partner_dropped: Tensor,
    outside_rows: Tensor,
    freq_patches: int,
    partners: Tensor | None = None,
) -> Tensor:
    """SRL target per mixed clip: (Y(clip i) + R_i) / 2, R_i = Y(clip i) inside the clean windows and
    its partner's (clip i-1 unless `partners` says) dropped-pass target (rows outside them) elsewhere."""
    partner = (
        torch.roll(partner_dropped, 1, dims=0)
        if partners is None
        else partner_dropped[partners.to(partner_dropped.device)]
    )
    retained = own.clone()
    retained[:, row_tokens(outside_rows, freq_patches)] = partner.to(own.dtype)
    return (own + retained) / 2


@dataclass
class Targets:
    """Teacher targets for one batch; rows follow the teacher batch (clean clips, then mixed ones)."""

    patch: Tensor  # (Bt, N, D)
    cls: Tensor  # (Bt, D)
    srl: Tensor | None = None  # (B, N, D), SSLAM only
    partner_dropped: Tensor | None = None  # (B, N_outside, D), SSLAM only


class PretrainingModel(nn.Module):
    """Student encoder + decoder and the EMA teacher; `forward` returns the loss terms of one step."""

    def __init__(self, model_cfg: ModelConfig, cfg: ObjectiveConfig | None = None):
        super().__init__()
        self.cfg = cfg or ObjectiveConfig()
        self.model_cfg = model_cfg
        self.student = Encoder(model_cfg)
        self.decoder = Decoder(model_cfg.embed_dim, self.cfg.decoder_layers, self.cfg.decoder_groups)
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.teacher.eval()

    @classmethod
    def from_weights(
        cls,
        model_cfg: ModelConfig,
        student: dict,
        teacher: dict | None = None,
        decoder: dict | None = None,
        cfg: ObjectiveConfig | None = None,
    ) -> PretrainingModel:
        """Build from state dicts in our names (teacher defaults to the student, decoder to a fresh one)."""
        model = cls(model_cfg, cfg)
        as_fp32 = lambda d: {k: v.float() for k, v in d.items()}  # noqa: E731
        model.student.load_state_dict(as_fp32(student))
        model.teacher.load_state_dict(as_fp32(teacher if teacher is not None else student))
        if decoder is not None:
            model.decoder.load_state_dict(as_fp32(decoder))
        return model

    @classmethod
    def from_checkpoint(cls, path: str | Path, cfg: ObjectiveConfig | None = None) -> PretrainingModel:
        """Resume pre-training from a checkpoint (official fairseq, HF or ours) via `read_checkpoint`."""
        from sslam_core.models.loading import read_checkpoint

        ckpt = read_checkpoint(path)
        model_cfg = replace(ckpt.config, num_classes=0)
        return cls.from_weights(model_cfg, ckpt.state, ckpt.teacher, ckpt.decoder, cfg)

    def train(self, mode: bool = True) -> PretrainingModel:
        super().train(mode)
        self.teacher.eval()
        return self

    @property
    def freq_patches(self) -> int:
        return self.model_cfg.freq_patches

    def make_masks(self, batch: int, frames: int, generator: torch.Generator | None = None) -> Tensor:
        """Fresh masks (batch * clone_batch, N) for a batch of clips, row = clip * clone_batch + clone."""
        grid = (frames // self.model_cfg.patch_size, self.freq_patches)
        c = self.cfg
        return block_mask(batch * c.clone_batch, grid, c.mask_prob, c.mask_length, c.mask_adjust, generator)

    @property
    def mixes(self) -> bool:
        """Whether a step mixes (stage 2 with `mix="partial"`): a mixed half, the SRL term."""
        return self.cfg.stage == "sslam" and self.cfg.mix == "partial"

    def partners(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """Mixing partner of each clip: clip i-1 (the release) or a random derangement."""
        return roll_partners(batch) if self.cfg.mix_partner == "roll" else random_partners(batch, generator)

    @torch.no_grad()
    def targets(
        self,
        source: Tensor,
        mixed: Tensor | None = None,
        windows: list[int] | None = None,
        partners: Tensor | None = None,
    ) -> Targets:
        """Teacher targets: per-patch (top-K average) and CLS (the mean patch of the top-K average, or of
        the last block alone: `utterance_target`); with mixing, the SRL target too."""
        teacher_in = source if mixed is None else torch.cat([source, mixed])
        _, ffn = self.teacher.contextualize(self.teacher.patchify(teacher_in.float()), collect="ffn")
        ffn = [y[:, 1:] for y in ffn]
        patch = regression_targets(ffn, self.cfg.average_top_k)
        last = self.cfg.utterance_target == "last"
        cls = (regression_targets(ffn[-1:], 1) if last else patch).mean(dim=1)
        if not self.mixes:
            return Targets(patch=patch, cls=cls)
        if mixed is None or windows is None:
            raise ValueError("the SSLAM objective needs the mixed batch and its clean windows")
        outside_rows = to_device(self.outside_rows(source.shape[2], windows), source.device)
        partner = self.dropped_targets(source, outside_rows)
        own = patch[: source.shape[0]]
        srl = source_retention_target(own, partner, outside_rows, self.freq_patches, partners)
        return Targets(patch=patch, cls=cls, srl=srl, partner_dropped=partner)

    def outside_rows(self, frames: int, windows: list[int]) -> Tensor:
        """Time-patch rows outside the clean windows (where the partner is audible in the mixture)."""
        p = self.model_cfg.patch_size
        inside = window_frames(frames, windows, self.cfg.window).view(-1, p)
        return (~inside.all(dim=1)).nonzero().flatten()

    @torch.no_grad()
    def dropped_targets(self, source: Tensor, outside_rows: Tensor) -> Tensor:
        """Second teacher pass on the clean clips with the window tokens dropped -> (B, N_outside, D)."""
        tokens = self.teacher.patchify(source.float())
        keep = row_tokens(outside_rows.to(tokens.device), self.freq_patches)
        _, ffn = self.teacher.contextualize(tokens[:, keep], collect="ffn")
        return regression_targets([y[:, 1:] for y in ffn], self.cfg.average_top_k)

    def predict(
        self,
        inputs: Tensor,
        masks: Tensor,
        generator: torch.Generator | None = None,
        keep: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Student + decoder on `clone_batch` masked copies of each input -> CLS (R, D), patches (R, N, D).
        keep: `visible_indices(masks)` on the inputs' device, if already known."""
        tokens = self.student.patchify(inputs).repeat_interleave(self.cfg.clone_batch, dim=0)
        if masks.shape != tokens.shape[:2]:
            raise ValueError(
                f"masks must be {tuple(tokens.shape[:2])} (rows, patches), got {tuple(masks.shape)}"
            )
        keep = visible_indices(masks) if keep is None else keep
        index = keep[..., None].expand(-1, -1, tokens.shape[-1])
        out, _ = self.student.contextualize(tokens.gather(1, index))
        # The decoder's grid takes the student's output dtype: under CUDA autocast the patch tokens are
        # bf16 (a convolution) while the blocks end in fp32 (post-LN, which autocast keeps in fp32).
        grid = out.new_zeros(tokens.shape)
        if self.cfg.mask_noise_std > 0:
            device = generator.device if generator is not None else tokens.device
            noise = torch.randn(tokens.shape, generator=generator, dtype=out.dtype, device=device)
            grid = noise.to(tokens.device) * self.cfg.mask_noise_std
        grid = grid.scatter(1, index, out[:, 1:])
        return out[:, 0], self.decoder(grid, self.freq_patches)

    def forward(
        self,
        source: Tensor,
        generator: torch.Generator | None = None,
        masks: Tensor | None = None,
        windows: list[int] | None = None,
        partners: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Loss terms of one step on a (B, 1, T, mel) batch of normalised log-mel clips.

        masks: (B * clone_batch, N) bool/uint8, True = masked (drawn when None); windows: SSLAM clean
        window starts in frames, partners: (B,) mixing partner of each clip (both drawn when None).
        Returns sums `patch_loss`, `cls_loss` (and `srl_loss` when mixing), their per-row values
        (`*_rows`), `sample_size` and `loss` = total / sample_size.
        """
        c = self.cfg
        B, _, T, _ = source.shape
        if masks is None:
            masks = self.make_masks(B, T, generator)
        masks = masks.to(torch.bool)
        mixed = None
        if c.stage == "sslam" and windows is None:  # drawn with mix="none" too: the same random stream
            windows = choose_windows(T, c.window, c.num_windows, generator)
        if self.mixes:
            if partners is None:
                partners = self.partners(B, generator)
            partners = to_device(partners, source.device)
            masks = torch.cat([masks, masks])
        # Masks and their visible indices are made where the masks are (the CPU, normally) and sent
        # without waiting for the GPU (see `transfer`).
        keep = to_device(visible_indices(masks), source.device)
        masks = to_device(masks, source.device)
        if self.mixes:
            mixed = partial_mix(source, windows, c.window, partners)
            student_in = torch.cat([source, mixed])
        else:
            student_in = source
        targets = self.targets(source, mixed, windows, partners)
        cls, pred = self.predict(student_in, masks, generator, keep=keep)

        scale = 1 / math.sqrt(pred.shape[-1])
        sample_size = masks.sum()
        rows = torch.arange(pred.shape[0], device=pred.device) // c.clone_batch

        def patch_rows(prediction: Tensor, target: Tensor, m: Tensor) -> Tensor:
            err = (prediction.float() - target).pow(2).sum(dim=-1) * scale
            return (err * m).sum(dim=1)

        out: dict[str, Tensor] = {}
        out["patch_loss_rows"] = patch_rows(pred, targets.patch[rows], masks)
        cls_err = (cls.float() - targets.cls[rows]).pow(2).sum(dim=-1) * scale
        out["cls_loss_rows"] = c.cls_loss * sample_size * cls_err
        total = out["patch_loss_rows"].sum() + out["cls_loss_rows"].sum()
        if targets.srl is not None:
            half = pred.shape[0] // 2
            srl = patch_rows(pred[half:], targets.srl[rows[:half]], masks[half:])
            out["srl_loss_rows"] = c.srl_weight * srl
            out["srl_loss"] = out["srl_loss_rows"].sum()
            total = total + out["srl_loss"]
        out["patch_loss"] = out["patch_loss_rows"].sum()
        out["cls_loss"] = out["cls_loss_rows"].sum()
        out["sample_size"] = sample_size
        out["loss"] = total / sample_size
        out["student_cls"] = cls.detach()
        return out

    @torch.no_grad()
    def ema_step(self, step: int) -> float:
        """Move the teacher towards the student with the decay for `step`; buffers are copied. Returns it."""
        decay = ema_decay_at(step, self.cfg)
        student = dict(self.student.named_parameters())
        names = [name for name, _ in self.teacher.named_parameters()]
        teacher = [t for _, t in self.teacher.named_parameters()]
        # one fused launch per op over all tensors (on an H200 a ViT-B update took 5.1 ms as a loop of
        # per-tensor ops); the same arithmetic, so the same bits
        torch._foreach_mul_(teacher, decay)
        torch._foreach_add_(teacher, [student[n].detach().float() for n in names], alpha=1 - decay)
        student_buffers = dict(self.student.named_buffers())
        for name, b in self.teacher.named_buffers():
            b.copy_(student_buffers[name])
        return decay


__all__ = [
    "ObjectiveConfig",
    "ema_decay_at",
    "Decoder",
    "regression_targets",
    "row_tokens",
    "source_retention_target",
    "Targets",
    "PretrainingModel",
]
