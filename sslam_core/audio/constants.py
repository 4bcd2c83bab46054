"""The signal constants, defined once (as whisper's `audio.py` does): the sample rate, the Kaldi frame
and hop, the mel bins, the time patch and the normalisation presets. Every module that needs one
imports it from here."""

from __future__ import annotations

SAMPLE_RATE = 16000  # Hz: every model input is 16 kHz mono
FRAME_SAMPLES = 400  # 25 ms analysis frame
HOP_SAMPLES = 160  # 10 ms frame shift
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_SAMPLES  # 100 fbank frames a second
N_FFT = 512  # next power of two above the frame
N_MELS = 128
PATCH_FRAMES = 16  # one time patch: 160 ms, the finest step at which windows can start
STEP_SECONDS = PATCH_FRAMES / FRAMES_PER_SECOND  # 0.16 s
DEFAULT_TARGET_LENGTH = 1024  # frames (10.24 s): the AudioSet models' input

# (mean, std) of the log-mel features of each data set; model input = (fbank - mean) / (2 * std).
NORMALIZATION: dict[str, tuple[float, float]] = {
    "audioset": (-4.268, 4.569),
    "esc50": (-6.627, 5.359),
    "spc2": (-6.846, 5.565),
    "spass": (-5.275, 3.268),
}


def frames_to_seconds(frames: float) -> float:
    """Fbank frames -> seconds."""
    return frames / FRAMES_PER_SECOND


__all__ = [
    "DEFAULT_TARGET_LENGTH",
    "FRAMES_PER_SECOND",
    "FRAME_SAMPLES",
    "HOP_SAMPLES",
    "NORMALIZATION",
    "N_FFT",
    "N_MELS",
    "PATCH_FRAMES",
    "SAMPLE_RATE",
    "STEP_SECONDS",
    "frames_to_seconds",
]
