"""Building the trainer's data: the tokenizer (from a vocabulary, the captions, or a checkpoint's saved
state), the train and val sets (synthetic, a caption file, or tar shards), the checks made before training
(mgpu.data.checks), and the loaders: a DistributedSampler in every mode (one process with batch 2B sees what
two ranks with batch B see), resumable mid-epoch, unpadded contiguous val shards so evaluation counts each
sample once, and for tar shards a stream with the same number of batches on every rank (mgpu.data.stream).
Everything takes a DataConfig, or the trainer's argparse Namespace (converted). Bad inputs raise DataError."""

from __future__ import annotations

import functools
import logging
import math
import os
import signal

import torch

from .. import distributed
from ..collate import collate_fn
from ..evaluate import shard
from ..tokenizers import ClipTokenizer, WordPiece
from . import checks
from .captions import CaptionFile, DataError, read_box_file
from .config import DataConfig
from .shards import TarSamples, expand, is_shards
from .stream import TarStream
from .synthetic import SyntheticCaptions

log = logging.getLogger("mgpu.data")


class _Cached(torch.utils.data.Dataset):
    """Keeps each generated sample: the synthetic set is deterministic, so this changes nothing but speed."""

    def __init__(self, dataset):
        self.dataset, self.cache = dataset, {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        if index not in self.cache:
            self.cache[index] = self.dataset[index]
        return self.cache[index]


def build_tokenizer(config, captions: list[str], state: dict | None):
    """The text tower's tokenizer; state (from a checkpoint) rebuilds a fallback vocabulary exactly."""
    config = DataConfig.from_args(config)
    if config.text_encoder.startswith("clip"):
        if state and state.get("kind") == "clip" and not config.clip_vocab:
            return ClipTokenizer.from_state(state)  # the ids it was trained with (old checkpoints: old order)
        return ClipTokenizer.load(config.clip_vocab, texts=captions)
    if state and state.get("kind") == "wordpiece" and not config.bert_vocab:
        return WordPiece(list(state["vocab"]))
    return WordPiece.load(config.bert_vocab) if config.bert_vocab else WordPiece.from_texts(captions)


def tokenizer_state(tokenizer) -> dict:
    if isinstance(tokenizer, ClipTokenizer):
        return tokenizer.state()
    return {"kind": "wordpiece", "vocab": list(tokenizer.vocab)}


def open_set(config: DataConfig, spec: str, on_bad: str):
    """Every sample of a caption file or of tar shards, map-style (validation, inference)."""
    if is_shards(spec):
        boxes = read_box_file(config.box_file) if config.box_file else None
        return TarSamples(spec, config.image_size, boxes=boxes, on_bad=on_bad)
    return CaptionFile(spec, config.image_size, img_key=config.csv_img_key, caption_key=config.csv_caption_key,
                       separator=config.csv_separator, box_file=config.box_file, on_bad=on_bad)


def _shard_sets(config: DataConfig, with_train: bool):
    """Tar shards: the training stream, and --val-data or the last shards held out (--val-fraction of them)."""
    boxes = read_box_file(config.box_file) if config.box_file else None
    paths = expand(config.data)
    if config.val_data:
        val = open_set(config, config.val_data, "raise")
    else:
        if len(paths) < 2:
            raise DataError(f"--data {config.data}: one shard cannot be split into training and validation: give "
                            f"--val-data, or more shards (the last --val-fraction of them are held out)")
        held = min(len(paths) - 1, max(1, math.ceil(len(paths) * config.val_fraction)))
        val = TarSamples(config.data, config.image_size, paths=paths[-held:], boxes=boxes, on_bad="raise")
        paths = paths[:-held]
    if not with_train:
        return None, val, []
    train = TarStream(config.data, config.image_size, paths=paths, seed=config.seed, boxes=boxes)
    return train, val, train.captions(10_000)


def build_sets(config, tokenizer_saved: dict | None, *, with_train: bool = True):
    """(train set, val set, tokenizer), without the checks: what build_data and mgpu.infer share. with_train
    False skips reading a training stream (train is then None for tar shards)."""
    config = DataConfig.from_args(config)
    if config.data == "synthetic":
        language = "zh" if config.text_encoder.startswith("bert") else "en"
        sizes = config.train_size, config.val_size, config.image_size, config.seed, language
        train, val = SyntheticCaptions("train", *sizes), SyntheticCaptions("val", *sizes)
        captions = [train.caption(i) for i in range(min(500, len(train)))]
    elif is_shards(config.data):
        train, val, captions = _shard_sets(config, with_train)
    else:
        train = open_set(config, config.data, "substitute")
        val = open_set(config, config.val_data, "raise") if config.val_data else None
        if val is None:
            if len(train) < 2:
                raise DataError(f"--data {config.data}: {len(train)} sample; give more, or --val-data")
            train, val = train.split(config.val_fraction, config.seed)
            val.on_bad = "raise"
        captions = [caption for _, caption in train.rows[:10_000]]
    tokenizer = build_tokenizer(config, captions, tokenizer_saved)
    for part in (train, val):
        if part is not None:
            part.tokenizer = tokenizer
    return train, val, tokenizer


def build_data(args, tokenizer_saved: dict | None):
    """(train set, val set, tokenizer) for the trainer, checked: unreadable validation images are left out,
    too many unreadable images or too small a validation set stop here, before any training."""
    config = DataConfig.from_args(args)
    train, val, tokenizer = build_sets(config, tokenizer_saved)
    if config.data != "synthetic":
        val = checks.check_images(train, val, limit=config.max_bad_images, where=f"--data {config.data}")
    checks.check_val_size(len(val), f"--data {config.data}" + (f" --val-data {config.val_data}" if config.val_data else ""))
    if config.data == "synthetic" and config.loader_workers == 0:
        per_sample = 3 * config.image_size ** 2 * 4
        if (len(train) + len(val)) * per_sample < 1 << 30:  # cache what fits in 1 GiB
            train, val = _Cached(train), _Cached(val)
    return train, val, tokenizer


def inference_set(config: DataConfig, data: str | None, tokenizer_saved: dict | None):
    """The rows mgpu.infer encodes, in order, never substituted (an unreadable row comes back marked invalid):
    every sample of --data, the val split of synthetic data, or the val split the checkpoint was trained with."""
    if data and data != "synthetic":
        dataset = open_set(config, data, "mark")
        dataset.tokenizer = build_tokenizer(config, [], tokenizer_saved)
        return dataset
    _, val, _ = build_sets(config.replace(data="synthetic") if data else config, tokenizer_saved, with_train=False)
    return val.subset(list(range(len(val))), on_bad="mark") if hasattr(val, "subset") else val


class _Resumable(torch.utils.data.Sampler):
    """A DistributedSampler that can start its next epoch part-way (after a resume)."""

    def __init__(self, sampler: torch.utils.data.DistributedSampler):
        self.sampler, self.skip = sampler, 0

    def set_epoch(self, epoch: int, skip_samples: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.skip = skip_samples

    def __iter__(self):
        return iter(list(self.sampler)[self.skip:])

    def __len__(self) -> int:
        return len(self.sampler) - self.skip


def _seed_worker(seed: int, worker: int) -> None:
    """Seeds a DataLoader worker; it ignores the stop signals, which reach it with its process group, so
    the main process can finish its step and save (workers exit with it; KILL still ends them)."""
    torch.manual_seed(seed * 1000 + worker)
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def build_loaders(args, train, val, loader_batch: int, device: torch.device):
    """(train loader, val loader, the object whose set_epoch(epoch, skip_samples) starts an epoch, steps an
    epoch). --workers None (the default) is mgpu.data.config.auto_workers()."""
    config = DataConfig.from_args(args)
    rank, world = distributed.rank(), distributed.world_size()
    workers = config.loader_workers
    if config.workers is None and rank == 0:
        log.info("DataLoader workers: %d per process (--workers auto: %d usable cores / %s process(es) on this "
                 "node, at most 8)", workers, len(os.sched_getaffinity(0)), os.environ.get("LOCAL_WORLD_SIZE", "1"))
    worker_seed = config.seed + rank
    common = dict(collate_fn=collate_fn, num_workers=workers, pin_memory=device.type == "cuda",
                  worker_init_fn=functools.partial(_seed_worker, worker_seed))
    generator = torch.Generator().manual_seed(worker_seed)  # workers' seeds never draw on the global RNG
    if isinstance(train, TarStream):
        steps_per_epoch = train.plan(world, rank, workers, loader_batch)
        train_loader = torch.utils.data.DataLoader(train, loader_batch, drop_last=True, persistent_workers=False,
                                                   generator=generator, **common)  # new workers read set_epoch
        epochs = train
    else:
        epochs = _Resumable(torch.utils.data.DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True,
                                                                seed=config.seed, drop_last=True))
        steps_per_epoch = len(epochs.sampler) // loader_batch
        if steps_per_epoch == 0:
            raise DataError(f"--batch-size {config.batch_size}: the training split has {len(train)} samples, fewer "
                            f"than one batch of {loader_batch} for each of {world} process(es); lower it or add data")
        train_loader = torch.utils.data.DataLoader(train, loader_batch, sampler=epochs, drop_last=True,
                                                   generator=generator, persistent_workers=workers > 0, **common)
    val_part = torch.utils.data.Subset(val, list(shard(len(val), rank, world)))
    val_loader = torch.utils.data.DataLoader(val_part, loader_batch, shuffle=False, persistent_workers=workers > 0,
                                             **common)
    return train_loader, val_loader, epochs, steps_per_epoch
