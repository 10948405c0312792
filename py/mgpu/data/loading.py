"""Building the trainer's data: the tokenizer (from a vocabulary, the captions, or a checkpoint's saved
state), the train and val sets (synthetic or a caption file), and the loaders: a DistributedSampler in
every mode (one process with batch 2B sees what two ranks with batch B see), resumable mid-epoch, and
unpadded contiguous val shards so evaluation counts each sample once. Bad inputs raise DataError."""

from __future__ import annotations

import functools
import signal

import torch

from .. import distributed
from ..collate import collate_fn
from ..evaluate import shard
from ..tokenizers import ClipTokenizer, WordPiece
from .captions import CaptionFile, DataError
from .synthetic import SyntheticCaptions


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


def build_tokenizer(args, captions: list[str], state: dict | None):
    """The text tower's tokenizer; state (from a checkpoint) rebuilds a fallback vocabulary exactly."""
    if args.text_encoder.startswith("clip"):
        if state and state.get("kind") == "clip" and not args.clip_vocab:
            return ClipTokenizer([tuple(m) for m in state["merges"]])
        return ClipTokenizer.load(args.clip_vocab, texts=captions)
    if state and state.get("kind") == "wordpiece" and not args.bert_vocab:
        return WordPiece(list(state["vocab"]))
    return WordPiece.load(args.bert_vocab) if args.bert_vocab else WordPiece.from_texts(captions)


def tokenizer_state(tokenizer) -> dict:
    if isinstance(tokenizer, ClipTokenizer):
        return {"kind": "clip", "merges": [list(m) for m in tokenizer.merges]}
    return {"kind": "wordpiece", "vocab": list(tokenizer.vocab)}


def build_data(args, tokenizer_saved: dict | None):
    """(train set, val set, tokenizer)."""
    if args.data == "synthetic":
        language = "zh" if args.text_encoder.startswith("bert") else "en"
        train = SyntheticCaptions("train", args.train_size, args.val_size, args.image_size, args.seed, language)
        val = SyntheticCaptions("val", args.train_size, args.val_size, args.image_size, args.seed, language)
        captions = [train.caption(i) for i in range(min(500, len(train)))]
    else:
        options = dict(img_key=args.csv_img_key, caption_key=args.csv_caption_key, separator=args.csv_separator,
                       box_file=args.box_file)
        train = CaptionFile(args.data, args.image_size, **options)
        val = CaptionFile(args.val_data, args.image_size, **options) if args.val_data else None
        if val is None:
            if len(train) < 2:
                raise DataError(f"--data {args.data}: {len(train)} sample; give more, or --val-data")
            train, val = train.split(args.val_fraction, args.seed)
        captions = [caption for _, caption in train.rows[:10_000]]
    tokenizer = build_tokenizer(args, captions, tokenizer_saved)
    train.tokenizer = val.tokenizer = tokenizer
    if args.data == "synthetic" and args.workers == 0:
        per_sample = 3 * args.image_size ** 2 * 4
        if (len(train) + len(val)) * per_sample < 1 << 30:  # cache what fits in 1 GiB
            train, val = _Cached(train), _Cached(val)
    return train, val, tokenizer


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
    rank, world = distributed.rank(), distributed.world_size()
    sampler = _Resumable(torch.utils.data.DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True,
                                                             seed=args.seed, drop_last=True))
    steps_per_epoch = len(sampler.sampler) // loader_batch
    if steps_per_epoch == 0:
        raise DataError(f"--batch-size {args.batch_size}: the training split has {len(train)} samples, fewer "
                         f"than one batch of {loader_batch} for each of {world} process(es); lower it or add data")
    worker_seed = args.seed + rank
    common = dict(collate_fn=collate_fn, num_workers=args.workers, pin_memory=device.type == "cuda",
                  persistent_workers=args.workers > 0,
                  worker_init_fn=functools.partial(_seed_worker, worker_seed))
    train_loader = torch.utils.data.DataLoader(train, loader_batch, sampler=sampler, drop_last=True,
                                               generator=torch.Generator().manual_seed(worker_seed), **common)
    val_part = torch.utils.data.Subset(val, list(shard(len(val), rank, world)))
    val_loader = torch.utils.data.DataLoader(val_part, loader_batch, shuffle=False, **common)
    return train_loader, val_loader, sampler, steps_per_epoch
