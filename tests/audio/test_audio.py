"""Decoding, channel averaging, torchaudio-exact resampling, streaming and bad-file errors."""

import builtins

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import DATA, FIXTURES

from sslam_core.audio.decode import audio_info, load_audio, stream_audio
from sslam_core.audio.files import AudioError
from sslam_core.audio.resample import StreamingResampler, _sinc_kernel, resample

RESAMPLE = np.load(FIXTURES / "frontend" / "resample_cases.npz")
RATES = sorted(int(k.split("__")[0]) for k in RESAMPLE.files if k.endswith("__in"))
FLAC = DATA / "typing_stereo_48k.flac"  # the 48 kHz resample case, stored as stereo PCM16
OGG = DATA / "robin.ogg"
MP3 = DATA / "acoustic_scene_2s.mp3"


@pytest.mark.parametrize("rate", RATES)
def test_resample_matches_torchaudio_bit_for_bit(rate):
    out = resample(torch.from_numpy(RESAMPLE[f"{rate}__in"]), rate, 16000)
    expected = RESAMPLE[f"{rate}__out"]
    assert out.shape == expected.shape and out.dtype == torch.float32
    np.testing.assert_array_equal(out.numpy(), expected)


def test_resample_batched_over_leading_dims_and_dtypes():
    x = torch.from_numpy(RESAMPLE["44100__in"][:44100])
    batch = torch.stack([x, -x, 0.5 * x]).reshape(3, 1, -1)
    out = resample(batch, 44100, 16000)
    assert out.shape == (3, 1, 16000)
    np.testing.assert_array_equal(out[1, 0].numpy(), resample(-x, 44100, 16000).numpy())
    double = resample(x.double(), 44100, 16000)
    assert double.dtype == torch.float64
    torch.testing.assert_close(double.float(), out[0, 0], rtol=0, atol=1e-5)
    assert resample(x, 16000, 16000) is x
    assert resample(x, 88200, 32000).shape == (16000,)  # same reduced ratio as 44100 -> 16000


def test_resample_output_length_is_ceil_and_kernel_is_cached():
    for length in (1, 2, 7, 441, 1000):
        assert resample(torch.zeros(length), 44100, 16000).shape[-1] == -(-16000 * length // 44100)
    a = _sinc_kernel(441, 160, torch.device("cpu"), torch.float32)
    assert a is _sinc_kernel(441, 160, torch.device("cpu"), torch.float32)
    with pytest.raises(TypeError):
        resample(torch.zeros(10, dtype=torch.int16), 8000, 16000)
    with pytest.raises(ValueError):
        resample(torch.zeros(10), 0, 16000)


@pytest.mark.distributed
@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_streaming_resampler_equals_whole_signal(rate):
    x = torch.from_numpy(RESAMPLE[f"{rate}__in"])
    rng = np.random.default_rng(rate)
    cuts = np.sort(rng.integers(0, len(x), size=12))
    resampler = StreamingResampler(rate, 16000)
    parts = [resampler.push(piece) for piece in np.split(x, cuts)] + [resampler.flush()]
    streamed = torch.cat(parts)
    assert streamed.shape == RESAMPLE[f"{rate}__out"].shape
    np.testing.assert_allclose(streamed.numpy(), RESAMPLE[f"{rate}__out"], rtol=0, atol=1e-6)


def test_stereo_flac_is_averaged_then_resampled_exactly():
    assert audio_info(FLAC) == (48000, 72005, 2, 72005 / 48000)
    native = load_audio(FLAC, sample_rate=48000)
    np.testing.assert_array_equal(native.numpy(), RESAMPLE["48000__in"])
    np.testing.assert_array_equal(load_audio(FLAC).numpy(), RESAMPLE["48000__out"])


@pytest.mark.slow
@pytest.mark.parametrize("path", [FLAC, OGG, MP3], ids=lambda p: p.suffix)
@pytest.mark.parametrize("block_seconds", [0.05, 0.37, 30.0])
def test_stream_equals_load(path, block_seconds):
    whole = load_audio(path)
    blocks = list(stream_audio(path, block_seconds=block_seconds))
    assert all(b.ndim == 1 and b.dtype == torch.float32 for b in blocks)
    if block_seconds < 1:
        assert len(blocks) > 3 and all(len(b) == int(block_seconds * 16000) for b in blocks[:-1])
    streamed = torch.cat(blocks)
    assert streamed.shape == whole.shape
    np.testing.assert_allclose(streamed.numpy(), whole.numpy(), rtol=0, atol=1e-6)


def test_compressed_real_files_decode():
    rate, frames, channels, seconds = audio_info(OGG)
    assert (rate, channels) == (22050, 1) and seconds == pytest.approx(2.6986, abs=1e-3)
    robin = load_audio(OGG)
    assert robin.shape == (-(-16000 * frames // 22050),) and torch.isfinite(robin).all()
    assert 0.01 < float(robin.abs().max()) <= 1.0
    assert audio_info(MP3)[:3] == (44100, 88200, 2)
    scene = load_audio(MP3, sample_rate=44100)
    assert scene.shape == (88200,) and 1e-3 < float(scene.std()) < 0.5


def test_errors_name_the_file_and_reason(tmp_path):
    good = tmp_path / "good.wav"
    sf.write(good, np.full(16000, 0.1, np.float32), 16000)
    raw = good.read_bytes()
    cases = {
        "empty.wav": (b"", "empty"),
        "header_cut.wav": (raw[:30], "cannot decode"),
        "data_cut.wav": (raw[: len(raw) // 2], "truncated WAV"),
        "garbage.wav": (np.random.default_rng(0).bytes(4000), "cannot decode"),
        "notes.txt": (b"not audio at all\n" * 50, "unsupported file type '.txt'"),
    }
    for name, (content, _) in cases.items():
        (tmp_path / name).write_bytes(content)
    sf.write(tmp_path / "nan.wav", np.full(800, np.nan, np.float32), 16000, subtype="FLOAT")
    cases["nan.wav"] = (None, "NaN")
    sf.write(tmp_path / "silent_header.wav", np.zeros(0, np.float32), 16000)
    cases["silent_header.wav"] = (None, "no samples")
    cases["missing.flac"] = (None, "not found")
    for name, (_, reason) in cases.items():
        for read in (load_audio, lambda p: list(stream_audio(p))):
            with pytest.raises(AudioError, match=reason) as err:
                read(tmp_path / name)
            message = str(err.value)
            assert name in message and "\n" not in message
    with pytest.raises(AudioError, match="truncated WAV"):
        audio_info(tmp_path / "data_cut.wav")


def test_missing_pyav_gives_install_hint(tmp_path, monkeypatch):
    path = tmp_path / "clip.m4a"
    path.write_bytes(b"\x00" * 64)
    real_import = builtins.__import__

    def no_av(name, *args, **kwargs):
        if name == "av":
            raise ImportError("no av")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_av)
    with pytest.raises(AudioError, match=r"clip\.m4a.*pip install 'sslam\[av\]'"):
        load_audio(path)


@pytest.mark.parametrize("suffix, codec", [(".m4a", "aac"), (".webm", "libopus")])
def test_pyav_formats(tmp_path, suffix, codec):
    av = pytest.importorskip("av")
    rate = 48000
    t = np.arange(int(1.5 * rate)) / rate
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    path = tmp_path / f"tone{suffix}"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = "stereo"
        frame = av.AudioFrame.from_ndarray(np.stack([tone, tone]), format="fltp", layout="stereo")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    info = audio_info(path)
    assert info[0] == rate and info[2] == 2 and info[3] == pytest.approx(1.5, abs=0.1)
    wave = load_audio(path)
    assert abs(len(wave) - 24000) < 1600 and torch.isfinite(wave).all()
    spectrum = np.abs(np.fft.rfft(wave.numpy()))
    assert spectrum.argmax() * 16000 / len(wave) == pytest.approx(440, abs=2)
    streamed = torch.cat(list(stream_audio(path, block_seconds=0.1)))
    np.testing.assert_allclose(streamed.numpy(), wave.numpy(), rtol=0, atol=1e-6)
