"""What building the data needs, as one typed value: ``DataConfig``. The trainer makes it from its command line
(``DataConfig.from_args``), ``mgpu.infer`` from a checkpoint's saved config (``DataConfig.from_mapping``), so
neither has to imitate the other's argparse Namespace. The defaults are the trainer's flag defaults."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Mapping

MAX_AUTO_WORKERS = 8


@dataclass(frozen=True)
class DataConfig:
    data: str = "synthetic"  # 'synthetic', a .csv/.tsv/.jsonl file, or .tar shards (see mgpu.data.shards)
    val_data: str | None = None
    val_fraction: float = 0.05
    train_size: int = 20_000  # synthetic only
    val_size: int = 1000  # synthetic only
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_separator: str | None = None
    box_file: str | None = None
    image_size: int = 224
    workers: int | None = None  # None: auto_workers()
    seed: int = 0
    max_bad_images: float = 0.01
    batch_size: int = 64  # per process; only named in messages (the loaders take theirs as an argument)
    text_encoder: str = "clip:ViT-B/32"
    clip_vocab: str | None = None
    bert_vocab: str | None = None

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], **overrides: Any) -> "DataConfig":
        """From a dict such as a checkpoint's saved config; unknown keys are ignored, missing ones default."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in {**values, **overrides}.items() if k in names})

    @classmethod
    def from_args(cls, args: Any) -> "DataConfig":
        """From the trainer's argparse Namespace (or any object with these attributes), or a DataConfig."""
        if isinstance(args, cls):
            return args
        return cls.from_mapping(vars(args))

    def replace(self, **changes: Any) -> "DataConfig":
        return dataclasses.replace(self, **changes)

    @property
    def loader_workers(self) -> int:
        """``workers``, or ``auto_workers()`` when it is None."""
        return auto_workers() if self.workers is None else self.workers


def auto_workers() -> int:
    """DataLoader workers per process when --workers is not given: the CPU cores this process may run on
    (its affinity mask: what taskset, cgroups cpusets and Slurm's --cpus-per-task leave it) divided by the
    processes on this node (LOCAL_WORLD_SIZE, set by torchrun; 1 otherwise), at most 8. Never more than the
    cores there are, so PyTorch's "suggested max number of worker" warning does not appear."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return min(MAX_AUTO_WORKERS, cores // local)
