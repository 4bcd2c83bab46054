"""The paper's fine-tuning protocols as named recipes: every setting of the official runs.

A recipe is a layer of `finetune_run.FinetuneSettings` values under the flag names, beneath a config
file and the flags given (which win). The values are those of the official runs: EAT's
`scripts/finetuning_{AS20K,ESC50,SPCv2}.sh` over its `config/finetuning.yaml`, SSLAM's
`SSLAM_Finetune/SSLAM_Ft_AS2M` (the run behind the paper's 50.2 mAP; EAT's own AS-2M script runs 300k
updates) and its `SPASS_Finetune_LinearEval/` runs, whose resolved configurations are kept in their
`experiments/` folders. Where each value comes from is recorded beside the tests, in
`tests/fixtures/recipes/official_recipes.json`.

What every official run shares: Adam (0.9, 0.95), weight decay 0.05, a cosine schedule to 1e-6, layer-wise
lr decay 0.65, drop-path 0.1, the CLS token, mixup with probability 0.9, SpecAugment and the waveform roll,
fp16 on one GPU, validation after every epoch and the best checkpoint by mAP (multi-label) or accuracy.
"""

from __future__ import annotations

from typing import Any

from sslam_core.errors import OptionError

COMMON: dict[str, Any] = dict(
    lr=5e-5,
    layer_decay=0.65,
    drop_path=0.1,
    weight_decay=0.05,
    min_lr=1e-6,
    pool="cls",
    target_length=1024,
    mixup=True,
    mixup_alpha=0.8,
    mixup_prob=0.9,
    specaugment=True,
    specaugment_ratio=0.2,
    roll=True,
    noise=False,
    label_smoothing=0.0,
    weighted_sampling=False,
    linear=False,
    seed=1,
    precision="fp16",
    save_every="epoch",
)

RECIPES: dict[str, dict[str, Any]] = {
    # AudioSet-2M: 96 clips per update, 200,000 distinct clips drawn per epoch by the label weights.
    "as2m": {**COMMON, "batch_size": 96, "steps": 400_000, "warmup": 40_000, "norm": "audioset",
             "multilabel": True, "weighted_sampling": True, "clips_per_epoch": 200_000},
    # AudioSet-20K (the balanced set): every clip once per epoch.
    "as20k": {**COMMON, "batch_size": 48, "steps": 40_000, "warmup": 4_000, "norm": "audioset",
              "multilabel": True},
    # ESC-50: 5 s clips (512 frames), no mixup, larger masks, label smoothing; five folds in one command.
    "esc50": {**COMMON, "batch_size": 48, "steps": 4_000, "warmup": 400, "target_length": 512,
              "norm": "esc50", "multilabel": False, "mixup": False, "specaugment_ratio": 0.4,
              "label_smoothing": 0.1, "cross_validate": True},
    # Speech Commands v2: 1 s clips (128 frames), fbank noise, BCE on the mixed one-hot targets (so the
    # script's label smoothing of 0.1 has no effect), seed 42.
    "spcv2": {**COMMON, "batch_size": 256, "lr": 2e-4, "steps": 40_000, "warmup": 4_000,
              "target_length": 128, "norm": "spc2", "multilabel": False, "noise": True, "loss": "bce",
              "label_smoothing": 0.1, "seed": 42},
    # SPASS scenes (3,750 training clips each): 50 epochs of 48 clips = 3,906 updates.
    "spass-linear": {**COMMON, "batch_size": 48, "lr": 1e-3, "steps": 3_906, "warmup": 0, "norm": "spass",
                     "multilabel": True, "linear": True, "probe": "augmented"},
    "spass-finetune": {**COMMON, "batch_size": 48, "steps": 3_906, "warmup": 390, "norm": "spass",
                       "multilabel": True},
}  # fmt: skip

# What a recipe's user must bring, for the docs and the summary line.
DATA: dict[str, str] = {
    "as2m": "AudioSet unbalanced + balanced training clips, 527 classes; validation on the evaluation set",
    "as20k": "AudioSet balanced training clips (about 20k), 527 classes; validation on the evaluation set",
    "esc50": "ESC-50 (meta/esc50.csv with its five folds), 50 classes",
    "spcv2": "Speech Commands v2, 35 classes; validation on its validation or test list",
    "spass-linear": "one SPASS scene: 3,750 training and 1,250 evaluation clips, multi-label",
    "spass-finetune": "one SPASS scene: 3,750 training and 1,250 evaluation clips, multi-label",
}

FOLD_SETTINGS = ("folds", "valid_folds")


def recipe_names() -> list[str]:
    """The recipes `--recipe` takes."""
    return list(RECIPES)


def recipe_layer(name: str) -> dict[str, Any]:
    """The settings of recipe `name` (a copy), for `finetune_run.resolve_settings`."""
    if name not in RECIPES:
        raise OptionError(f"unknown recipe {name!r}; choose {', '.join(RECIPES)}")
    return {**RECIPES[name], "recipe": name}


def with_recipe(name: str | None, *layers: dict[str, Any]) -> list[dict[str, Any]]:
    """The setting layers with recipe `name` beneath them (flags and config files win). A length given by
    the user (`--steps` or `--epochs`) replaces the recipe's, and its warm-up becomes the recipe's share
    (10 % in every official run that warms up). Folds given by the user (`--folds`, `--valid-folds`) ask
    for one split, so they turn the recipe's five-fold cross-validation off unless asked for too."""
    if not name:
        return list(layers)
    base = recipe_layer(name)
    given = {k: v for layer in layers for k, v in layer.items() if v is not None}
    if "steps" in given or "epochs" in given:
        base.pop("steps")
        if base["warmup"] and "warmup" not in given:
            base.pop("warmup")
    folds_given = any(k in given for k in FOLD_SETTINGS)
    if base.get("cross_validate") and folds_given and "cross_validate" not in given:
        base["cross_validate"] = False
    return [base, *layers]


__all__ = ["RECIPES", "DATA", "recipe_names", "recipe_layer", "with_recipe"]
