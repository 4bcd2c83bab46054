"""sslam: SSLAM / EAT audio transformers without fairseq.

    import sslam_core
    model = sslam_core.load_model("ta012/SSLAM_pretrain")        # or a .pt / folder / .safetensors
    feats = model(sslam_core.prepare_input(waves))                 # (B, 1 + N, D), CLS first
    for rec in sslam_core.embed(model, ["a.wav", "b.flac"]): ...   # clip / frame / patch features
    for res in sslam_core.tag(classifier, ["a.wav"]): ...          # class scores, whole file and per window

Names are imported on first use, so `import sslam_core` stays cheap.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "AudioError": "audio.files",
    "load_audio": "audio.decode",
    "resample": "audio.resample",
    "fbank": "audio.frontend",
    "normalize": "audio.frontend",
    "pad_or_crop": "audio.frontend",
    "prepare_input": "audio.frontend",
    "CheckpointError": "models.checkpoint",
    "load_model": "models.factory",
    "read_checkpoint": "models.loading",
    "save_checkpoint": "models.layouts.native",
    "Classifier": "models.transformer",
    "Encoder": "models.transformer",
    "ModelConfig": "models.transformer",
    "build_model": "models.transformer",
    "preset": "models.transformer",
    "embed": "inference.embeddings",
    "tag": "inference.tagging",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"sslam_core.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'sslam_core' has no attribute {name!r}")
