"""Training on tar shards as a stream: sequential reads, split by rank and by DataLoader worker, every rank the
same number of batches, and an exact resume.

One epoch, for S = ranks x workers streams ("slots"), batch B, and N samples in all:
1. The shards are put in an order drawn from (seed, epoch), the same on every rank, and read as one sequence of
   N samples.
2. Slot s = rank x workers + worker takes the contiguous part [s N / S, (s + 1) N / S) of that sequence: whole
   shards, and a part of one at each end (reaching it costs a read of the member headers before it, no image).
3. Each slot mixes its samples through a shuffle buffer of ``buffer`` samples (its own generator, drawn from
   seed, epoch and slot), and yields exactly ``N // S // B`` batches of B. The DataLoader takes one batch from
   each worker in turn, so a rank makes ``workers x N // S // B`` steps an epoch, like every other rank: DDP
   never waits for a rank that ran out. What is left over (less than one batch a slot) waits for the next
   epoch's order.
4. A sample that cannot be used (no image or caption member, an image that does not decode) is skipped and
   reported to the trainer like a skipped row of a caption file; a slot that runs short for that reason reads
   its part again (in a new order) to fill its last batches.

Resume: ``set_epoch(epoch, skip)`` with skip = the samples this rank already took this epoch (the trainer's
steps x batch). Each worker works out how many of the batches it yielded were among them (the DataLoader's
turn order is fixed), skips that many samples of its slot, and starts the turn where the last run stopped. The
resumed run therefore reads the same samples in the same order as a run that did not stop, provided it has the
same ranks, workers, batch size and seed, and every sample skipped was readable (each unreadable one in the
skipped part shifts the rest by one sample, because skipping reads headers only). Shards wholly before the
resume point are not opened.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Iterator

import torch

from .captions import DataError, add_tokens
from .shards import Record, expand, read_sample, scan, sizes


class TarStream(torch.utils.data.IterableDataset):
    def __init__(self, spec: str, image_size: int, *, paths: list[Path] | None = None, seed: int = 0,
                 buffer: int = 1000, tokenizer: Callable | None = None, boxes: dict | None = None):
        """spec: the --data value (named in messages); paths: its shards, if not all of expand(spec)."""
        self.spec, self.image_size, self.seed, self.buffer = spec, image_size, seed, buffer
        self.paths = list(paths) if paths is not None else expand(spec)
        self.counts = sizes(self.paths)
        self.tokenizer, self.boxes = tokenizer, boxes or {}
        self.world, self.rank, self.workers, self.batch = 1, 0, 1, 1
        self.epoch, self.skip = 0, 0

    @property
    def total(self) -> int:
        return sum(self.counts)

    def plan(self, world: int, rank: int, workers: int, batch: int) -> int:
        """Sets how the stream is cut; returns the batches (steps) a rank makes each epoch."""
        self.world, self.rank, self.workers, self.batch = world, rank, max(workers, 1), batch
        steps = self.workers * self.batches_per_slot
        if steps == 0:
            slots = self.world * self.workers
            raise DataError(f"--data {self.spec}: {self.total} samples in {len(self.paths)} shard(s) make "
                            f"{self.total // slots} for each of {slots} streams ({self.world} process(es) x "
                            f"{self.workers} worker(s)), fewer than one batch of {batch}; lower --batch-size or "
                            f"--workers, or add data")
        return steps

    @property
    def batches_per_slot(self) -> int:
        return self.total // (self.world * self.workers) // self.batch

    def __len__(self) -> int:
        return self.workers * self.batches_per_slot * self.batch  # this rank's samples an epoch

    def set_epoch(self, epoch: int, skip_samples: int = 0) -> None:
        """The epoch to stream, and the samples of it this rank took already (a resume); read by the workers
        when they start (the loader's workers are not persistent)."""
        self.epoch, self.skip = epoch, skip_samples

    def captions(self, limit: int) -> list[str]:
        """Up to limit captions from the first shards (for a tokenizer's fallback vocabulary)."""
        out: list[str] = []
        for path in self.paths:
            for record in scan(path):
                if "txt" in record.members:
                    out.append(record.read("txt").decode("utf-8", "replace").strip())
                if len(out) >= limit:
                    return out
        return out

    def _pieces(self, slot: int) -> list[tuple[int, int, int]]:
        """(shard, first, end) sample ranges of slot's part of this epoch's sequence."""
        order = list(range(len(self.paths)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        slots = self.world * self.workers
        lo, hi = slot * self.total // slots, (slot + 1) * self.total // slots
        pieces, start = [], 0
        for shard in order:
            end = start + self.counts[shard]
            if end > lo and start < hi:
                pieces.append((shard, max(lo, start) - start, min(hi, end) - start))
            start = end
        return pieces

    def _records(self, pieces: list[tuple[int, int, int]]) -> Iterator[Record]:
        for shard, first, end in pieces:
            for n, record in enumerate(scan(self.paths[shard])):
                if n >= end:
                    break
                if n >= first:
                    yield record

    def _shuffled(self, records: Iterator[Record], rng: random.Random) -> Iterator[Record]:
        pool: list[Record] = []
        for record in records:
            if len(pool) < self.buffer:
                pool.append(record)
                continue
            i = rng.randrange(len(pool))
            pool[i], record = record, pool[i]
            yield record
        rng.shuffle(pool)
        yield from pool

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if workers != self.workers:
            raise RuntimeError(f"TarStream planned for {self.workers} workers, run by {workers}: call plan() with "
                               f"the DataLoader's num_workers")
        done = self.skip // self.batch  # batches this rank took already this epoch
        logical = (worker + done) % workers  # the loader's turn restarts at worker 0
        done_here = done // workers + (1 if logical < done % workers else 0)
        slot = self.rank * workers + logical
        budget = (self.batches_per_slot - done_here) * self.batch
        to_skip = done_here * self.batch
        if budget == 0:
            return
        pieces, skipped, emitted = self._pieces(slot), [], 0
        for round_ in range(1 << 30):
            rng = random.Random(f"{self.seed}/{self.epoch}/{slot}/{round_}")
            usable = tried = good = 0
            for record in self._shuffled(self._records(pieces), rng):
                if record.problem() is None:
                    usable += 1
                    if to_skip:
                        to_skip -= 1
                        continue
                elif to_skip:
                    continue
                tried += 1
                sample, problem = read_sample(record, self.image_size, self.boxes)
                if problem:
                    skipped.append((f"{record.shard}:{record.key}", problem))
                    continue
                good, budget, emitted = good + 1, budget - 1, emitted + 1
                sample.update(skipped=skipped, index=torch.tensor(emitted - 1))
                skipped = []
                yield add_tokens(sample, self.tokenizer)
                if budget == 0:
                    return
            if usable == 0 or (tried and not good):  # a round that only skipped goes on to the next
                raise DataError(f"--data {self.spec}: none of the samples of stream {slot} can be read"
                                + (f"; the first: {skipped[0][0]} ({skipped[0][1]})" if skipped else ""))
