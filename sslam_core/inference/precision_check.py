"""Does a faster precision keep this model's decisions? The check `--precision auto` runs on first use.

The model runs on windows of real audio (the built-in check clips, or the user's `calibration` folder)
in fp32 and in the faster precision. It passes when the two agree on the top class of at least 98 % of
the windows (classifiers) and the pooled encoder output keeps a cosine of 0.999 or more on every window.
The verdict is cached per checkpoint content, precision, CPU capability and clips, so the check costs
its few seconds once.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sslam_core.audio.constants import HOP_SAMPLES
from sslam_core.audio.decode import stream_audio
from sslam_core.audio.files import AudioError
from sslam_core.audio.frontend import prepare_input
from sslam_core.data.label_formats import AUDIO_EXTENSIONS
from sslam_core.errors import OptionError
from sslam_core.inference.pipeline import autocast
from sslam_core.models.onnx_export import INT8_SCHEME, cache_dir
from sslam_core.models.onnx_runtime import OnnxModel
from sslam_core.models.transformer import Classifier

CHECK_CLIPS = Path(__file__).resolve().parent / "check_clips"
AGREEMENT = 0.98  # top-1 agreement with fp32 a faster precision must reach
MIN_COSINE = 0.999  # and the cosine of its pooled encoder output on every window
MAX_WINDOWS = 32
CHECK_FRAMES = 8192  # frames per precision of the built-in check: 32 short windows, or 8 of 10.24 s
VERSION = 2  # of the check: 2 streams the clips (flat memory for long calibration files)


@dataclass(frozen=True)
class PrecisionCheck:
    """The verdict on `precision` for one model: whether it passed, on how many windows, the top-1
    agreement with fp32 (classifiers; None for encoders) and the lowest cosine of the pooled output."""

    precision: str
    passed: bool
    windows: int
    top1_agreement: float | None
    min_cosine: float
    clips: str

    def summary(self) -> str:
        """One line: what was compared and what came out."""
        agree = "" if self.top1_agreement is None else f"top-1 agreement {self.top1_agreement:.3f}, "
        return f"{self.windows} windows of {self.clips}: {agree}lowest cosine {self.min_cosine:.5f}"


def check_clips(calibration: str | os.PathLike | None = None) -> list[Path]:
    """The audio files of the `calibration` folder (sorted), else the built-in check clips."""
    folder = Path(calibration) if calibration else CHECK_CLIPS
    if not folder.is_dir():
        raise OptionError(f"--calibration {folder}: not a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
    if not files:
        raise OptionError(f"--calibration {folder}: holds no audio files")
    return files


def _windows(files: list[Path], target_length: int, count: int) -> list[torch.Tensor]:
    """`count` windows of `target_length` frames from the readable files played one after another
    (repeated when shorter than a window), each starting a 1/count turn later around the loop: as many
    distinct windows for a 10 s model as for a 0.64 s one. At most `count` windows' worth of audio is
    decoded, streamed, however long the files: memory stays flat for a folder of long recordings."""
    size = target_length * HOP_SAMPLES
    budget = count * size
    waves, total = [], 0
    for path in files:
        if total >= budget:
            break
        try:
            for block in stream_audio(path):
                waves.append(block[: budget - total])
                total += waves[-1].shape[0]
                if total >= budget:
                    break
        except AudioError:
            continue
    if not total:
        raise OptionError("none of the check clips could be decoded")
    medley = torch.cat(waves)
    n = medley.shape[0]
    loop = n if n >= size else n * (size // n + 1)  # shorter than a window: played again until it fills one
    step = loop // count
    return [medley[(k * step + torch.arange(size)) % loop % n] for k in range(count)]


def _outputs(model, x: torch.Tensor, precision: str, device: torch.device) -> tuple:
    """(pooled encoder output, class scores or None) of a batch at `precision`. An ONNX (int8) model runs
    one window per pass, as the pipeline runs it."""
    if isinstance(model, OnnxModel):
        rows = [_outputs_onnx(model, x[i : i + 1]) for i in range(x.shape[0])]
        pooled = torch.cat([r[0] for r in rows])
        return pooled, (torch.cat([r[1] for r in rows]) if rows[0][1] is not None else None)
    with torch.inference_mode(), autocast(device, precision):
        if isinstance(model, Classifier):
            features = model.features(x)
            return model.pooled(features).float(), model.classify(features).float()
        features = model(x)
        return features[:, 0].float(), None


def _outputs_onnx(model, x: torch.Tensor) -> tuple:
    features = model.features(x)
    if isinstance(model, Classifier):
        return model.pooled(features).float(), model(x).float()
    return features[:, 0].float(), None


def run_check(
    model,
    precision: str,
    device: str | torch.device = "cpu",
    calibration: str | os.PathLike | None = None,
    candidate=None,
) -> PrecisionCheck:
    """Run `model` (a torch Encoder or Classifier) on the check windows in fp32 and at `precision`; or,
    given `candidate` (its int8 ONNX Runtime model), compare that with `model` in fp32."""
    device = torch.device(device)
    target_length = int(getattr(model, "target_length", None) or 1024)
    norm = getattr(model, "normalization", None) or "audioset"
    count = MAX_WINDOWS if calibration else max(8, min(MAX_WINDOWS, CHECK_FRAMES // target_length))
    waves = _windows(check_clips(calibration), target_length, count)
    cos, same = [], []
    for start in range(0, len(waves), 8):
        batch = [w.to(device) for w in waves[start : start + 8]]
        x = prepare_input(batch, target_length=target_length, norm=norm)
        ref_pooled, ref_scores = _outputs(model, x, "fp32", device)
        got_pooled, got_scores = _outputs(candidate if candidate is not None else model, x, precision, device)
        cos.append(torch.nn.functional.cosine_similarity(got_pooled, ref_pooled, dim=-1))
        if ref_scores is not None:
            same.append(got_scores.argmax(-1) == ref_scores.argmax(-1))
    lowest = float(torch.cat(cos).min())
    agreement = float(torch.cat(same).float().mean()) if same else None
    passed = lowest >= MIN_COSINE and (agreement is None or agreement >= AGREEMENT)
    clips = "the built-in check clips" if calibration is None else str(calibration)
    return PrecisionCheck(precision, passed, len(waves), agreement, round(lowest, 6), clips)


def cached_check(
    model,
    precision: str,
    device: str | torch.device = "cpu",
    calibration: str | os.PathLike | None = None,
    capability: str = "",
    candidate=None,
) -> tuple[PrecisionCheck, bool]:
    """`run_check`, cached under the cache folder by the checkpoint's sha256, the precision, the device
    kind and `capability`, and the clips; returns (verdict, whether it came from the cache). A model
    without a recorded sha256 is checked every time."""
    sha = (getattr(model, "checkpoint_info", None) or {}).get("sha256")
    files = check_clips(calibration)
    clips = hashlib.sha256("".join(f"{p.name}:{p.stat().st_size};" for p in files).encode()).hexdigest()[:16]
    key = hashlib.sha256(
        json.dumps(
            [VERSION, sha, precision, INT8_SCHEME, torch.device(device).type, capability, clips]
        ).encode()
    ).hexdigest()[:32]
    path = cache_dir() / "precision" / f"{key}.json"
    if sha and path.is_file():
        try:
            return PrecisionCheck(**json.loads(path.read_text())), True
        except (OSError, ValueError, TypeError):
            pass  # a damaged cache entry is checked again
    verdict = run_check(model, precision, device, calibration, candidate)
    if sha:
        try:
            from sslam_core.runs.outputs import atomic_write

            text = json.dumps(asdict(verdict))
            atomic_write(path, lambda tmp: Path(tmp).write_text(text))
        except OSError:
            pass  # an unwritable cache only costs the check next time
    return verdict, False


__all__ = [
    "PrecisionCheck",
    "run_check",
    "cached_check",
    "check_clips",
    "CHECK_CLIPS",
    "AGREEMENT",
    "MIN_COSINE",
]
