"""`--precision auto`: the CPU capability detection, the choice it makes (on this CPU and with the
capability forced through SSLAM_CPU_CAPABILITY), and the commands end to end on a tiny model."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT, sslam

from sslam_core.models import precision
from sslam_core.models.layouts.native import save_checkpoint
from sslam_core.models.loading import read_checkpoint
from sslam_core.models.precision import (
    CpuCapability,
    auto_precision,
    cpu_capability,
    parse_flags,
    resolve_precision,
    strict_fp32,
)

TAGGER = ROOT / "tests" / "fixtures" / "checkpoints" / "tiny_finetuned.pt"
ENCODER = ROOT / "tests" / "fixtures" / "checkpoints" / "tiny_pretrain.pt"
CLIP = ROOT / "tests" / "data" / "real_32k.wav"
CPU = torch.device("cpu")


def caps(text: str) -> CpuCapability:
    return CpuCapability(parse_flags(text), "test")


def test_parse_flags_and_names():
    assert parse_flags(" AVX512F, avx512_bf16 +amx_bf16") == {"avx512f", "avx512_bf16", "amx_bf16"}
    assert parse_flags("none") == frozenset() and parse_flags("") == frozenset()
    assert [caps(t).name for t in ("amx_bf16,avx512f", "avx512f,avx512_bf16", "avx512f", "avx2", "")] == [
        "AMX_BF16",
        "AVX512_BF16",
        "AVX512",
        "AVX2",
        "DEFAULT",
    ]
    assert str(caps("avx2")) == "AVX2 (test)"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [("avx2", "fp32"), ("avx2,avx512f,avx512_vnni", "fp32"), ("avx512f,avx512_bf16", "bf16"),
     ("amx_bf16", "bf16"), ("none", "fp32")],
)  # fmt: skip
def test_auto_on_a_forced_cpu(flags, expected):
    chosen, why = auto_precision(CPU, caps(flags))
    assert chosen == expected and ("natively" in why) == (expected == "bf16")
    assert resolve_precision("auto", CPU, caps(flags)) == expected


def test_auto_on_gpus_and_other_devices():
    cuda = torch.device("cuda")
    assert auto_precision(cuda, cuda_bf16=True)[0] == "bf16"
    assert auto_precision(cuda, cuda_bf16=False)[0] == "fp32"
    assert auto_precision(torch.device("mps"))[0] == "fp32"
    for explicit in ("fp32", "bf16", "fp16", "int8"):
        assert resolve_precision(explicit, CPU, caps("avx2")) == explicit


def test_this_cpu_is_detected(monkeypatch):
    monkeypatch.delenv(precision.ENV, raising=False)
    found = cpu_capability()
    assert found.source in ("torch", "/proc/cpuinfo") or found.source.startswith("no detection")
    flags = precision._cpuinfo_flags()
    if flags is not None:  # Linux x86: torch's detection and the kernel's flags agree on bf16
        assert found.native_bf16 == any(f in flags for f in precision.BF16_FLAGS)
    assert auto_precision(CPU)[0] == ("bf16" if found.native_bf16 else "fp32")


def test_override_and_cpuinfo_fallback(monkeypatch, tmp_path):
    monkeypatch.setenv(precision.ENV, "avx2")
    assert cpu_capability() == CpuCapability(frozenset({"avx2"}), precision.ENV)
    monkeypatch.delenv(precision.ENV)
    monkeypatch.setattr(precision, "_torch_flags", lambda: None)
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    read = precision._cpuinfo_flags
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: read(info))
    assert cpu_capability().native_bf16 and cpu_capability().source == "/proc/cpuinfo"


@pytest.mark.parametrize("flags", ["avx2", "avx512f,avx512_bf16"])
def test_tag_auto_end_to_end(flags):
    """On a CPU auto tries int8 first: the tiny tagger keeps its top classes there (one window per pass),
    so it runs int8 whatever the bf16 support, and its output is `--precision int8`'s."""
    args = ("tag", CLIP, "-c", TAGGER, "-f", "json", "-k", "3", "--device", "cpu")
    auto = sslam(*args, "--precision", "auto", env={precision.ENV: flags})
    notes = [line for line in auto.stderr.splitlines() if "--precision auto runs" in line]
    assert len(notes) == 1 and "runs int8: it keeps this model's results" in notes[0], auto.stderr
    again = sslam(*args, "--precision", "auto", env={precision.ENV: flags})
    assert "quantising" not in again.stderr and "(checked before:" in again.stderr  # made and checked once
    same = sslam(*args, "--precision", "int8")
    assert json.loads(auto.stdout) == json.loads(same.stdout)


def cancelling_tagger(path, gain: float = 1000.0) -> None:
    """The tiny tagger with a first-block MLP whose output is the small difference of two large halves:
    hidden units 128-255 copy 0-127 with weights 1.001 times larger, and fc2 adds the first half times
    `gain` and subtracts the second. bf16's rounding of the hidden units is larger than their
    difference, so bf16 changes this model's output where fp32 does not."""
    ckpt = read_checkpoint(TAGGER)
    state = dict(ckpt.state)
    mlp = "encoder.blocks.0.mlp."
    w1, b1, w2 = (state[mlp + n].clone() for n in ("fc1.weight", "fc1.bias", "fc2.weight"))
    w1[128:], b1[128:] = w1[:128] * 1.001, b1[:128] * 1.001
    w2[:, 128:], w2[:, :128] = -gain * w2[:, :128], gain * w2[:, :128]
    state.update({mlp + "fc1.weight": w1, mlp + "fc1.bias": b1, mlp + "fc2.weight": w2})
    save_checkpoint(path, ckpt.config, state, labels=ckpt.labels, extra=ckpt.extra)


def test_auto_where_int8_cannot_run_checks_bf16_and_falls_back_to_fp32(tmp_path):
    """Block 1 of a tagger that bf16 cannot run (`cancelling_tagger`): the int8 graph gives the last
    block only, so bf16 is checked instead, and it moves the results: auto keeps fp32 and says why."""
    tagger = tmp_path / "cancelling.safetensors"
    cancelling_tagger(tagger)
    args = ("extract", CLIP, "-c", tagger, "--layer", "1", "--device", "cpu", "--overwrite")
    auto = sslam(
        *args, "-o", tmp_path / "a.h5", "--precision", "auto", env={precision.ENV: "avx512f,avx512_bf16"}
    )
    notes = [line for line in auto.stderr.splitlines() if "--precision auto" in line]
    assert len(notes) == 1 and "runs fp32: bf16 moved this model's results" in notes[0], auto.stderr
    sslam(*args, "-o", tmp_path / "b.h5", "--precision", "fp32")
    with h5py.File(tmp_path / "a.h5") as a, h5py.File(tmp_path / "b.h5") as b:
        assert np.array_equal(a["clip"][:], b["clip"][:])
    plain = sslam(*args, "-o", tmp_path / "a.h5", "--precision", "auto", env={precision.ENV: "avx2"})
    assert "runs fp32: the CPU has no native bf16" in plain.stderr


def test_bf16_keeps_the_near_chance_taggers_top_class(tmp_path):
    """The test suite's near-chance 527-class tagger, whose close scores swapped under bf16 while its
    head ran in bf16: with the output block, fc_norm and the head in fp32, auto's check passes bf16."""
    args = ("extract", CLIP, "-c", TAGGER, "--layer", "1", "--device", "cpu", "--overwrite")
    auto = sslam(
        *args, "-o", tmp_path / "a.h5", "--precision", "auto", env={precision.ENV: "avx512f,avx512_bf16"}
    )
    assert "runs bf16: the CPU computes bf16 natively" in auto.stderr, auto.stderr
    assert "top-1 agreement 1.000" in auto.stderr


def test_extract_auto_end_to_end(tmp_path):
    out = {}
    for name, option in (("auto", "auto"), ("fp32", "fp32")):  # block 1: no int8 graph, no native bf16
        out[name] = tmp_path / f"{name}.h5"
        sslam("extract", CLIP, "-c", ENCODER, "-o", out[name], "--device", "cpu", "--precision", option,
              "--layer", "1", env={precision.ENV: "avx2"})  # fmt: skip
    with h5py.File(out["auto"]) as a, h5py.File(out["fp32"]) as b:
        assert np.array_equal(a["clip"][:], b["clip"][:])


def test_auto_checks_the_model_once_and_runs_bf16_where_it_keeps_its_results(tmp_path):
    """An encoder whose vectors keep a cosine of 0.999 under bf16 on the check clips runs bf16 (block 1:
    the int8 graph gives the last block only); the verdict is cached per checkpoint, and --calibration
    checks on the user's own clips."""
    args = ("extract", CLIP, "-c", ENCODER, "--device", "cpu", "--overwrite", "--layer", "1")
    flags = {precision.ENV: "avx512f,avx512_bf16"}
    first = sslam(*args, "-o", tmp_path / "auto.h5", "--precision", "auto", env=flags)
    assert (
        "runs bf16: the CPU computes bf16 natively" in first.stderr
        and "checked now on this model" in first.stderr
    )
    again = sslam(*args, "-o", tmp_path / "auto.h5", "--precision", "auto", env=flags)
    assert "checked before on this model: 8 windows of the built-in check clips" in again.stderr
    sslam(*args, "-o", tmp_path / "bf16.h5", "--precision", "bf16")
    with h5py.File(tmp_path / "auto.h5") as a, h5py.File(tmp_path / "bf16.h5") as b:
        assert np.array_equal(a["clip"][:], b["clip"][:])
    clips = ROOT / "tests" / "data" / "fsdd_mini"
    own = sslam(*args, "-o", tmp_path / "auto.h5", "--precision", "auto", "--calibration", clips, env=flags)
    assert "32 windows of" in own.stderr and "fsdd_mini" in own.stderr
    bad = sslam(*args, "-o", tmp_path / "auto.h5", "--precision", "auto", "--calibration", tmp_path / "none",
                env=flags, code=2)  # fmt: skip
    assert "--calibration" in bad.stderr and "not a folder" in bad.stderr


def test_auto_runs_int8_when_it_keeps_the_results_and_reuses_the_verdict(tmp_path, monkeypatch):
    monkeypatch.setenv("SSLAM_CACHE", str(tmp_path / "cache"))
    args = ("extract", CLIP, "-c", ENCODER, "--device", "cpu", "--overwrite")
    first = sslam(*args, "-o", tmp_path / "auto.h5", "--precision", "auto")
    assert (
        f"note: --precision auto: quantising the int8 model of {ENCODER} to check it (once;" in first.stderr
    )
    assert "runs int8: it keeps this model's results (checked now: 8 windows" in first.stderr
    again = sslam(*args, "-o", tmp_path / "auto.h5", "--precision", "auto")
    assert "(checked before:" in again.stderr
    sslam(*args, "-o", tmp_path / "int8.h5", "--precision", "int8")
    with h5py.File(tmp_path / "auto.h5") as a, h5py.File(tmp_path / "int8.h5") as b:
        assert np.array_equal(a["clip"][:], b["clip"][:])


def test_the_check_compares_top_classes_and_cosines_on_the_clips(tmp_path):
    from sslam_core.inference.precision_check import run_check
    from sslam_core.models.factory import load_model

    tagger = load_model(TAGGER)
    verdict = run_check(tagger, "fp32")  # fp32 against itself: identical
    assert verdict.passed and verdict.top1_agreement == 1.0 and verdict.min_cosine == pytest.approx(1.0)
    kept = run_check(tagger, "bf16")  # the output block, fc_norm and head in fp32
    assert kept.windows == 8 and kept.top1_agreement == 1.0 and kept.min_cosine > 0.9999 and kept.passed
    cancelling_tagger(tmp_path / "cancelling.safetensors")
    moved = run_check(load_model(tmp_path / "cancelling.safetensors"), "bf16")
    assert moved.windows == 8 and moved.top1_agreement < 0.98 and moved.min_cosine < 0.99 and not moved.passed
    encoder = run_check(load_model(ENCODER), "bf16")
    assert encoder.top1_agreement is None and encoder.min_cosine >= 0.999 and encoder.passed


def test_unknown_precision_is_one_line():
    result = sslam("tag", CLIP, "-c", TAGGER, "--precision", "fp8", code=2)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "choose fp32, bf16, fp16, int8, auto" in lines[0]


def test_bf16_on_a_cpu_without_native_bf16_says_so():
    args = ("tag", CLIP, "-c", TAGGER, "-f", "json", "--device", "cpu", "--precision", "bf16")
    emulated = sslam(*args, env={precision.ENV: "avx2"}).stderr
    assert "no native bf16" in emulated and "AVX2" in emulated
    assert "no native bf16" not in sslam(*args, env={precision.ENV: "avx512f,avx512_bf16"}).stderr


def test_strict_fp32_turns_tf32_off_for_a_gpu_block_and_restores_it():
    """`--precision fp32` on a GPU means IEEE fp32: PyTorch's default TF32 convolutions (the patch
    embedding) moved a ViT-B's CUDA outputs from the CPU's; the block switches TF32 off and restores the
    user's settings after, also when the block raises. Flags only: this runs on a CPU build too."""
    knobs = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
    saved = [k.fp32_precision for k in knobs]
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        with strict_fp32(torch.device("cuda")):
            assert [k.fp32_precision for k in knobs] == ["ieee", "ieee"]
        assert [k.fp32_precision for k in knobs] == ["tf32", "tf32"]
        with pytest.raises(RuntimeError), strict_fp32(torch.device("cuda")):
            raise RuntimeError("boom")
        assert [k.fp32_precision for k in knobs] == ["tf32", "tf32"]
        with strict_fp32(torch.device("cpu")):  # nothing to switch on a CPU
            assert [k.fp32_precision for k in knobs] == ["tf32", "tf32"]
    finally:
        for k, v in zip(knobs, saved, strict=True):
            k.fp32_precision = v


def test_bf16_inference_runs_the_last_block_in_fp32_and_training_does_not():
    """Under the pipeline's bf16 autocast the output block runs in fp32 (it carries most of bf16's
    error: docs/guides/cpu-deployment.md); a plain autocast (training) keeps every block in bf16."""
    from sslam_core.inference.pipeline import autocast
    from sslam_core.models.transformer import Encoder, ModelConfig

    torch.manual_seed(0)
    model = Encoder(ModelConfig(embed_dim=64, depth=3, num_heads=2, max_length=16)).eval()
    seen: list[torch.dtype] = []
    for block in model.blocks:
        block.mlp.fc1.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    x = torch.randn(2, 1, 64, 128)
    with torch.inference_mode(), autocast(torch.device("cpu"), "bf16"):
        tail = model(x)
    assert seen == [torch.bfloat16, torch.bfloat16, torch.float32] and tail.dtype == torch.float32
    seen.clear()
    with torch.inference_mode(), autocast(torch.device("cpu"), "bf16"):
        model(x, layer=2)  # the output block of a shorter pass is its last one
    assert seen == [torch.bfloat16, torch.float32]
    seen.clear()
    with torch.autocast("cpu", torch.bfloat16):
        model(x)
    assert seen == [torch.bfloat16] * 3
    seen.clear()
    with torch.inference_mode():
        exact = model(x)
    with torch.inference_mode(), autocast(torch.device("cpu"), "bf16"):
        again = model(x)
    assert torch.nn.functional.cosine_similarity(again[:, 0], exact[:, 0], dim=-1).min() > 0.999


@pytest.mark.parametrize("name", ["fp32", "bf16"])
def test_what_the_batch_changes_in_torch_precisions(name):
    """A file's torch scores in a batch of other files differ from its scores alone in the last bits
    only (matrix kernels block the work by batch size): within 1e-6 in fp32. With --batch-size 1 every
    window is its own pass and the bits are those of the file alone, in any company and order (int8
    always runs so: tests/models/test_onnx.py)."""
    from sslam_core.inference.tagging import tag
    from sslam_core.models.factory import load_model

    model = load_model(TAGGER)
    other = ROOT / "tests" / "data" / "robin.ogg"
    alone = next(tag(model, [str(CLIP)], target_length=256, batch_size=1, precision=name))
    for batch in ([other, CLIP], [CLIP, other, CLIP]):
        paths = [str(p) for p in batch]
        grouped = list(tag(model, paths, target_length=256, batch_size=8, precision=name))
        single = list(tag(model, paths, target_length=256, batch_size=1, precision=name))
        for many, one, path in zip(grouped, single, batch, strict=True):
            if path == CLIP:
                np.testing.assert_array_equal(one.scores, alone.scores)
                np.testing.assert_allclose(
                    many.scores, alone.scores, rtol=0, atol=1e-6 if name == "fp32" else 1e-2
                )


def test_auto_without_the_onnx_extra_checks_bf16(tmp_path, monkeypatch):
    """The [onnx] extra made unimportable: auto cannot try int8 and goes on to bf16, as it says."""
    import sys

    monkeypatch.setitem(sys.modules, "onnxscript", None)  # `import onnxscript` raises ImportError
    args = ("extract", CLIP, "-c", ENCODER, "-o", tmp_path / "a.h5", "--device", "cpu", "--precision", "auto")
    auto = sslam(*args, env={precision.ENV: "avx512f,avx512_bf16"})
    notes = [line for line in auto.stderr.splitlines() if "--precision auto" in line]
    assert len(notes) == 1 and "runs bf16: the CPU computes bf16 natively" in notes[0], auto.stderr


@pytest.mark.slow
def test_a_long_calibration_file_is_read_only_as_far_as_the_check_needs(tmp_path):
    """--calibration of an hour-long recording: the check streams 32 windows' worth of it, so its memory
    stays far below the 230 MB the whole file takes as float32 samples."""
    import subprocess
    import sys

    import soundfile as sf

    rng = np.random.default_rng(0)
    with sf.SoundFile(tmp_path / "hour.flac", "w", 16000, 1, format="FLAC") as f:
        for _ in range(60):
            f.write((rng.standard_normal(16000 * 60) * 0.05).astype(np.float32))
    code = (
        "import resource, sys\n"
        "from sslam_core.inference import precision_check as P\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "windows = P._windows(P.check_clips(sys.argv[1]), 1024, 32)\n"
        "print(len(windows), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True
    )
    count, grown_mb = map(int, out.stdout.split())
    assert count == 32 and grown_mb < 100, out.stdout
