"""The Kaldi fbank front end against the official torchaudio outputs in tests/fixtures/frontend."""

import numpy as np
import pytest
import torch
from conftest import FIXTURES

from sslam_core.audio.constants import NORMALIZATION
from sslam_core.audio.frontend import fbank, log_mel, normalize, num_frames, pad_or_crop, prepare_input
from sslam_core.audio.resample import resample

FRONTEND = FIXTURES / "frontend"
CASES = np.load(FRONTEND / "fbank_cases.npz")
NAMES = sorted({key.split("__")[0] for key in CASES.files})
FBANK_NAMES = [n for n in NAMES if f"{n}__fbank" in CASES.files]
INPUT_KEYS = [k for k in CASES.files if "__input" in k]


def _rate(name: str) -> int:
    key = f"{name}__sr_in"
    return int(CASES[key]) if key in CASES.files else 16000


@pytest.mark.parametrize("name", FBANK_NAMES)
def test_fbank_matches_official_bit_for_bit(name):
    out = fbank(torch.from_numpy(CASES[f"{name}__wave"]))
    expected = CASES[f"{name}__fbank"]
    assert out.shape == (1, *expected.shape)
    np.testing.assert_array_equal(out[0].numpy(), expected)


@pytest.mark.parametrize("key", INPUT_KEYS)
def test_prepare_input_reproduces_official_chain(key):
    name, target = key.split("__input")
    raw = CASES[f"{name}__raw"]
    out = prepare_input(raw, sample_rate=_rate(name), target_length=int(target))
    assert out.shape == (1, 1, int(target), 128) and out.dtype == torch.float32
    np.testing.assert_array_equal(out[0, 0].numpy(), CASES[key])


def test_resample_chain_gives_official_16k_wave():
    raw = torch.from_numpy(CASES["real_32k__raw"])
    assert int(CASES["real_32k__sr_in"]) == 32000
    wave = resample(raw, 32000, 16000)
    np.testing.assert_array_equal((wave - wave.mean()).numpy(), CASES["real_32k__wave"])
    np.testing.assert_array_equal(fbank(raw, sample_rate=32000).numpy(), fbank(wave).numpy())


def test_silence_is_log_eps_and_padding_value():
    fb = fbank(CASES["silence_500ms__wave"])
    assert torch.all(fb == np.float32(np.log(np.finfo(np.float32).eps)))
    inp = prepare_input(CASES["silence_500ms__raw"])[0, 0]
    assert torch.allclose(inp[:48], torch.tensor(-1.2775646)) and torch.allclose(
        inp[48:], torch.tensor(0.46706066)
    )


def test_mel_bin_3_is_constant_floor():
    fb = fbank(CASES["noise_3s__wave"])[0]
    assert torch.all(fb[:, 3] == fb[0, 3]) and float(fb[0, 3]) == pytest.approx(-15.942385)


def test_short_clip_gives_zero_frames_not_a_crash():
    wave = torch.from_numpy(CASES["short_390__wave"])
    assert fbank(wave).shape == (1, 0, 128)
    assert fbank(torch.zeros(3, 399)).shape == (3, 0, 128)
    assert num_frames(390) == 0 and num_frames(400) == 1 and num_frames(160000) == 998
    inp = prepare_input(CASES["short_390__raw"])
    assert torch.allclose(inp, torch.tensor(0.46706066))


def test_batched_equals_per_clip():
    waves = torch.from_numpy(
        np.stack([CASES[f"{n}__wave"][:32000] for n in ("noise_3s", "exact_10s", "long_12s")])
    )
    batched = fbank(waves)
    assert batched.shape == (3, 198, 128)
    for i in range(3):
        np.testing.assert_array_equal(batched[i].numpy(), fbank(waves[i])[0].numpy())


def test_long_input_is_processed_in_blocks_identically():
    wave = torch.from_numpy(CASES["long_12s__wave"])
    full = fbank(wave)[0]
    np.testing.assert_array_equal(full.numpy(), CASES["long_12s__fbank"])
    np.testing.assert_array_equal(fbank(wave[:40000])[0].numpy(), full[: num_frames(40000)].numpy())


def test_prepare_input_list_of_different_lengths_matches_each_case():
    names = ["noise_3s", "chirp_1s", "long_12s", "silence_500ms", "exact_10s"]
    out = prepare_input([torch.from_numpy(CASES[f"{n}__raw"]) for n in names])
    assert out.shape == (5, 1, 1024, 128)
    for i, n in enumerate(names):
        np.testing.assert_array_equal(out[i, 0].numpy(), CASES[f"{n}__input1024"])


def test_numpy_and_tensor_inputs_agree_and_log_mel_is_fbank():
    wave = CASES["chirp_1s__wave"]
    assert log_mel is fbank
    np.testing.assert_array_equal(fbank(wave).numpy(), fbank(torch.from_numpy(wave)).numpy())
    assert fbank(wave.astype(np.float64)).dtype == torch.float64
    from_double = prepare_input(CASES["chirp_1s__raw"].astype(np.float64))
    assert from_double.dtype == torch.float32
    np.testing.assert_array_equal(from_double[0, 0].numpy(), CASES["chirp_1s__input1024"])


def test_pad_or_crop_and_normalize():
    fb = torch.arange(10 * 128, dtype=torch.float32).reshape(1, 10, 128)
    padded = pad_or_crop(fb, 16)
    assert padded.shape == (1, 16, 128) and torch.all(padded[:, 10:] == 0) and torch.equal(padded[:, :10], fb)
    assert torch.equal(pad_or_crop(fb, 4), fb[:, :4])
    mean, std = NORMALIZATION["esc50"]
    assert torch.allclose(normalize(fb, "esc50"), (fb - mean) / (2 * std))
    assert torch.allclose(normalize(fb, (1.0, 0.5)), fb - 1.0)
    assert set(NORMALIZATION) == {"audioset", "esc50", "spc2", "spass"}
    with pytest.raises(ValueError, match="unknown normalisation"):
        normalize(fb, "nope")


def test_other_presets_and_target_length():
    raw = CASES["real_5s__raw"]
    out = prepare_input(raw, target_length=512, norm="spc2")
    fb = torch.from_numpy(CASES["real_5s__input512"]) * (2 * 4.569) - 4.268
    torch.testing.assert_close(out[0, 0], normalize(fb, "spc2"), rtol=0, atol=2e-5)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="expected a 1-D wave"):
        fbank(torch.zeros(2, 2, 1000))
    with pytest.raises(ValueError, match="must be 1-D"):
        prepare_input([torch.zeros(2, 1000)])
