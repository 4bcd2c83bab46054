"""Training data: random crops of 16 kHz waveforms, from audio files, tar shards or packed HDF5 shards.

Datasets return raw wave crops (cheap, in DataLoader workers); `AudioBatches` turns a list of them into
the model input on the training device in one batched fbank call, padding short clips in the log-mel
domain as the official code does. Crops and the shuffle are functions of (epoch seed, clip index), so a
resumed run sees exactly the clips and crops the interrupted one would have seen.

Packed folders (`sslam pack`, format in `data.packing`) are read by `PackedDataset`.
"""

from __future__ import annotations

import bisect
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from sslam_core.audio.constants import FRAME_SAMPLES, HOP_SAMPLES, SAMPLE_RATE
from sslam_core.audio.decode import load_audio, resolve_input
from sslam_core.audio.files import AudioError, AudioFile, AudioSource
from sslam_core.data.packing import is_packed, read_index, read_offsets
from sslam_core.errors import OptionError
from sslam_core.runs.interrupts import ignore_stop_signals

MAX_SUBSTITUTES = 16


class UnreadableAudioWarning(UserWarning):
    """A training clip that could not be decoded and was replaced by another clip."""


def crop_samples(target_length: int) -> int:
    """Samples that make exactly `target_length` fbank frames (25 ms window, 10 ms hop)."""
    return FRAME_SAMPLES + (target_length - 1) * HOP_SAMPLES


def crop_start(length: int, wanted: int, seed: int, index: int, random_crop: bool = True) -> int:
    """Start of the crop of clip `index` in epoch `seed`: uniform over valid starts, 0 when it fits."""
    if not random_crop or length <= wanted:
        return 0
    return int(np.random.default_rng([seed, index]).integers(0, length - wanted + 1))


def shard_indices(n: int, epoch_seed: int, rank: int, world_size: int, shuffle: bool = True) -> list[int]:
    """This rank's clips for one epoch: an equal slice of a seeded permutation (the remainder is dropped)."""
    order = (
        torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed)) if shuffle else torch.arange(n)
    )
    per_rank = n // world_size
    return order[rank * per_rank : (rank + 1) * per_rank].tolist()


# ---------------------------------------------------------------------------------------------------------
# Datasets


class ClipDataset(Dataset, ABC):
    """Shared indexing: item `i` or `(i, seed)` -> {wave, index, label?, skipped}; bad clips replaced."""

    def __init__(self, target_length: int, random_crop: bool, labels: Sequence | None):
        if labels is not None and len(labels) != len(self):
            raise OptionError(f"{len(labels)} labels for {len(self)} clips")
        self.target_length, self.random_crop, self.labels = target_length, random_crop, labels
        self.seed = 0
        self._bad: dict[int, str] = {}

    @abstractmethod
    def __len__(self) -> int:
        """Number of clips."""

    @abstractmethod
    def path(self, index: int) -> str:
        """Where clip `index` came from (for warnings and provenance)."""

    @abstractmethod
    def read(self, index: int, seed: int) -> torch.Tensor:
        """The (cropped) 1-D float32 wave of clip `index`; raises AudioError when it cannot be decoded."""

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, seed = key if isinstance(key, tuple) else (key, self.seed)
        skipped = []
        for attempt in range(MAX_SUBSTITUTES):
            i = (index + attempt) % len(self)
            if i not in self._bad:
                try:
                    wave = self.read(i, seed)
                except AudioError as err:
                    self._bad[i] = err.reason
                else:
                    item = {"wave": wave, "index": i, "skipped": skipped}
                    if self.labels is not None:
                        item["label"] = self.labels[i]
                    return item
            skipped.append((self.path(i), self._bad[i]))
        raise AudioError(self.path(index), f"this and the next {MAX_SUBSTITUTES - 1} clips are unreadable")


def load_source(source: str | os.PathLike | AudioFile | AudioSource) -> torch.Tensor:
    """The whole 16 kHz mono wave of a path, a member of another file (a tar member) or a
    self-decoding source; AudioError when it cannot be decoded."""
    if isinstance(source, str | os.PathLike | AudioFile):
        return load_audio(source, SAMPLE_RATE)
    parts = list(source.blocks(60.0))
    if not parts:
        raise AudioError(source.name, "contains no samples")
    return torch.cat(parts)


def _source(path: str | os.PathLike | AudioFile | AudioSource) -> str | AudioFile | AudioSource:
    """A path as a string, a `SHARD.tar/MEMBER` name as its TarMember (the shard indexed once here,
    not again in every DataLoader worker), any other source as it is."""
    if not isinstance(path, (str, os.PathLike)):
        return path
    try:
        found = resolve_input(path)
    except AudioError:  # reading it will report why
        return os.fspath(path)
    return os.fspath(found) if isinstance(found, (str, os.PathLike)) else found


class WaveformDataset(ClipDataset):
    """Audio decoded to 16 kHz mono, randomly cropped to `target_length` frames' worth of samples. The
    inputs are paths, or sources such as tar members (`tar.TarMember`, which reads its bytes by
    offset in whichever DataLoader worker asks for it; their `SHARD.tar/MEMBER` names work too)."""

    def __init__(
        self,
        paths: Sequence[str | os.PathLike | AudioFile | AudioSource],
        target_length: int = 1024,
        random_crop: bool = True,
        labels: Sequence | None = None,
    ):
        self.paths = [_source(p) for p in paths]
        super().__init__(target_length, random_crop, labels)

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, index: int) -> str:
        source = self.paths[index]
        return source if isinstance(source, str) else source.name

    def read(self, index: int, seed: int) -> torch.Tensor:
        wave = load_source(self.paths[index])
        wanted = crop_samples(self.target_length)
        start = crop_start(wave.shape[0], wanted, seed, index, self.random_crop)
        return wave[start : start + wanted].clone()


@dataclass
class _Shard:
    file: str
    offsets: np.ndarray


class PackedDataset(ClipDataset):
    """Clips from `sslam pack` folders; reads only the cropped slice, one open file per shard and process."""

    def __init__(
        self,
        folders: str | os.PathLike | Sequence[str | os.PathLike],
        target_length: int = 1024,
        random_crop: bool = True,
        labels: Sequence | None = None,
    ):
        folders = [folders] if isinstance(folders, (str, os.PathLike)) else list(folders)
        self.shards: list[_Shard] = []
        for folder in map(Path, folders):
            for name in read_index(folder)["shards"]:
                self.shards.append(_Shard(str(folder / name["file"]), read_offsets(folder / name["file"])))
        self._starts = np.cumsum([0] + [len(s.offsets) - 1 for s in self.shards]).tolist()
        self._files: dict[int, h5py.File] = {}
        self._pid = os.getpid()
        super().__init__(target_length, random_crop, labels)

    def __len__(self) -> int:
        return self._starts[-1]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"clip {index} out of range for {len(self)} packed clips")
        shard = bisect.bisect_right(self._starts, index) - 1
        return shard, index - self._starts[shard]

    def _file(self, shard: int) -> h5py.File:
        if self._pid != os.getpid():  # a forked worker must not share its parent's HDF5 handles
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            self._files[shard] = h5py.File(self.shards[shard].file, "r")
        return self._files[shard]

    def path(self, index: int) -> str:
        shard, local = self._locate(index)
        value = self._file(shard)["paths"][local]
        return value.decode() if isinstance(value, bytes) else str(value)

    def read(self, index: int, seed: int) -> torch.Tensor:
        shard, local = self._locate(index)
        begin, end = self.shards[shard].offsets[local : local + 2]
        wanted = crop_samples(self.target_length)
        start = begin + crop_start(int(end - begin), wanted, seed, index, self.random_crop)
        samples = self._file(shard)["audio"][start : min(end, start + wanted)]
        return torch.from_numpy(samples.astype(np.float32) / 32768.0)


def open_audio_dataset(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    target_length: int = 1024,
    random_crop: bool = True,
    recursive: bool = True,
) -> ClipDataset:
    """PackedDataset for packed folders, else WaveformDataset over the audio of `paths`: files,
    folders and lists (`list_audio`) and tar shard specs (their members, read by offset; unreadable
    ones are kept and reported as skipped when drawn, like bad files). A DatasetError naming the first
    problem when nothing at all is readable."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    packed = [is_packed(p) for p in paths]
    if all(packed):
        return PackedDataset(paths, target_length, random_crop)
    if any(packed):
        raise OptionError("mix of packed folders and audio files; pack them all or pass none packed")
    from sslam_core.audio.tar import Unreadable
    from sslam_core.data.datasets import list_audio
    from sslam_core.data.label_formats import DatasetError
    from sslam_core.data.shards import is_shard_spec, shard_sources

    sources: list = []
    for item in map(os.fspath, paths):
        sources += shard_sources(item) if is_shard_spec(item) else list_audio([item], recursive=recursive)
    problems = [s for s in sources if isinstance(s, Unreadable)]
    if problems and len(problems) == len(sources):
        raise DatasetError(f"{problems[0].name}: {problems[0].reason}")
    return WaveformDataset(sources, target_length, random_crop)


# ---------------------------------------------------------------------------------------------------------
# Batches on the device


def collate_clips(items: list[dict]) -> dict:
    """Keep waves as a list (lengths differ); stack tensor labels."""
    batch = {
        "waves": [item["wave"] for item in items],
        "index": torch.tensor([item["index"] for item in items]),
        "skipped": [s for item in items for s in item["skipped"]],
    }
    if "label" in items[0]:
        labels = [item["label"] for item in items]
        batch["label"] = torch.stack([torch.as_tensor(x) for x in labels])
    return batch


class AudioBatches:
    """A task's `batches`: this rank's shuffled clips, loaded by workers, fbank computed on `device`.

    Yields {"source": (B, 1, T, 128), "index": (B,), "label": (B, ...) when the dataset has labels}.
    Unreadable clips are replaced by the next readable one, warned about once and kept in `skipped`.
    """

    def __init__(
        self,
        dataset: ClipDataset,
        batch_size: int,
        device: str | torch.device = "cpu",
        norm: str | tuple[float, float] = "audioset",
        num_workers: int = 0,
        shuffle: bool = True,
        transform: Callable[[dict], dict] | None = None,
        wave_transform: Callable[[list[torch.Tensor], torch.Generator], list[torch.Tensor]] | None = None,
    ):
        self.dataset, self.batch_size, self.device = dataset, batch_size, torch.device(device)
        self.norm, self.num_workers, self.shuffle, self.transform = norm, num_workers, shuffle, transform
        self.wave_transform = wave_transform  # e.g. the waveform roll; its generator is seeded per batch
        self.skipped: dict[str, str] = {}

    def batches_per_epoch(self, world_size: int = 1) -> int:
        return len(self.dataset) // world_size // self.batch_size

    def __call__(self, epoch_seed: int, rank: int, world_size: int, start_position: int) -> Iterator[dict]:
        from sslam_core.audio.frontend import prepare_input

        order = shard_indices(len(self.dataset), epoch_seed, rank, world_size, self.shuffle)
        count = len(order) // self.batch_size
        if count == 0:
            raise OptionError(
                f"{len(self.dataset)} clips too few for batches of {self.batch_size} on {world_size} rank(s)"
            )
        plan = [
            [(i, epoch_seed) for i in order[b * self.batch_size : (b + 1) * self.batch_size]]
            for b in range(start_position, count)
        ]
        if not plan:
            return
        loader = DataLoader(
            self.dataset,
            batch_sampler=plan,
            num_workers=self.num_workers,
            collate_fn=collate_clips,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=ignore_stop_signals if self.num_workers else None,
            # The loader's base seed comes from here, not the global RNG (dropout's), whose draws would
            # otherwise depend on where the epoch's loader was started: at the epoch start or a resume.
            generator=torch.Generator().manual_seed(epoch_seed + rank),
        )
        for position, raw in enumerate(loader, start=start_position):
            for path, reason in raw["skipped"]:
                if path not in self.skipped:
                    self.skipped[path] = reason
                    warnings.warn(
                        f"{path}: {reason}; using another clip", UnreadableAudioWarning, stacklevel=2
                    )
            waves = raw["waves"]
            if self.wave_transform is not None:  # seeded by the batch's place: a resumed run draws the same
                seed = (epoch_seed * 1_000_003 + rank * 10_007 + position) % (2**63)
                waves = self.wave_transform(list(waves), torch.Generator().manual_seed(seed))
            waves = [w.to(self.device, non_blocking=True) for w in waves]
            batch = {
                "source": prepare_input(waves, target_length=self.dataset.target_length, norm=self.norm),
                "index": raw["index"].to(self.device),
            }
            if "label" in raw:
                batch["label"] = raw["label"].to(self.device, non_blocking=True)
            yield self.transform(batch) if self.transform is not None else batch


# ---------------------------------------------------------------------------------------------------------
# Packing


__all__ = [
    "UnreadableAudioWarning",
    "crop_samples",
    "crop_start",
    "shard_indices",
    "ClipDataset",
    "WaveformDataset",
    "load_source",
    "PackedDataset",
    "open_audio_dataset",
    "collate_clips",
    "AudioBatches",
]
