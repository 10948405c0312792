"""Tar shards (webdataset layout): naming the shards, reading samples by their headers, sizes.json, the
map-style view, and the training stream: split by rank and worker, equal batches everywhere, an exact resume."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from mgpu.collate import collate_fn
from mgpu.data import shards
from mgpu.data.captions import DataError
from mgpu.data.shards import TarSamples, expand, scan
from mgpu.data.stream import TarStream


def jpeg(k: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (k * 37 % 256, k * 11 % 256, 200)).save(buf, "JPEG")
    return buf.getvalue()


def make_shards(folder: Path, sizes: list[int], bad: dict[int, str] | None = None, extra: bool = False) -> list[Path]:
    """Shards of consecutive samples k (caption "sample k"); bad[k]: "image" (not a JPEG), "no-image", "no-caption"."""
    folder.mkdir(parents=True, exist_ok=True)
    k, paths = 0, []
    for s, size in enumerate(sizes):
        path = folder / f"{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for _ in range(size):
                kind = (bad or {}).get(k)
                members = [("jpg", b"garbage" if kind == "image" else jpeg(k)), ("txt", f"sample {k}".encode())]
                if extra:
                    members.append(("json", b"{}"))
                for ext, data in members:
                    if (ext, kind) in (("jpg", "no-image"), ("txt", "no-caption")):
                        continue
                    info = tarfile.TarInfo(f"{k:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                k += 1
        paths.append(path)
    return paths


def tokens(texts: list[str]) -> torch.Tensor:
    return torch.ones(len(texts), 3, dtype=torch.long)


def number(caption: str) -> int:
    return int(caption.split()[1])


def test_shards_are_named_by_braces_globs_or_a_folder(tmp_path):
    paths = make_shards(tmp_path / "s", [2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2])
    assert expand(str(tmp_path / "s/{000009..000011}.tar")) == paths[9:12]  # the padding kept past 9
    assert expand(str(tmp_path / "s/{000000,000003}.tar")) == [paths[0], paths[3]]
    assert expand(str(tmp_path / "s/00001*.tar")) == paths[10:12]
    assert expand(str(tmp_path / "s")) == paths
    for spec, message in [("s/{000010..000013}.tar", "no such shard"), ("s/x*.tar", "matches no file"),
                          ("s/{000003..000001}.tar", "runs backwards")]:
        with pytest.raises(DataError, match=message):
            expand(str(tmp_path / spec))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="the folder holds no .tar shard"):
        expand(str(tmp_path / "empty"))


def test_samples_are_grouped_by_key_from_the_headers(tmp_path):
    path = make_shards(tmp_path, [4], bad={1: "no-caption", 2: "no-image"}, extra=True)[0]
    records = list(scan(path))
    assert [r.key for r in records] == ["000000", "000001", "000002", "000003"]
    assert set(records[0].members) == {"jpg", "txt", "json"} and records[0].read("txt") == b"sample 0"
    assert [r.problem() for r in records] == [None, "no caption member (.txt)",
                                              "no image member (.jpg, .jpeg, .png or .webp)", None]
    (tmp_path / "broken.tar").write_bytes(path.read_bytes()[:700])
    with pytest.raises(DataError, match="broken.tar: not a readable tar file"):
        list(scan(tmp_path / "broken.tar"))


def test_sizes_json_is_used_when_it_lists_a_shard_and_written_by_the_cli(tmp_path, monkeypatch, capsys):
    paths = make_shards(tmp_path, [3, 5])
    assert shards.sizes(paths) == [3, 5]
    assert shards.main([str(tmp_path / "{000000..000001}.tar"), "--write-sizes"]) == 0
    assert "8\tsamples in 2 shard(s)" in capsys.readouterr().out
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"000000.tar": 3, "000001.tar": 5}
    monkeypatch.setattr(shards, "scan", lambda path: pytest.fail(f"{path} was scanned"))
    assert shards.sizes(paths) == [3, 5]


def test_the_map_style_view_reads_every_sample_and_marks_what_cannot_be_read(tmp_path):
    make_shards(tmp_path, [3, 0, 4], bad={4: "image"})
    spec = str(tmp_path / "{000000..000002}.tar")
    data = TarSamples(spec, 32, on_bad="mark")
    assert len(data) == 7 and data.row_info(3) == ("000002.tar:000003", "000003.jpg")
    assert [number(data[i]["caption"]) for i in range(7)] == list(range(7))
    assert data[4]["valid"].item() is False and data[4]["problem"] == "unreadable: UnidentifiedImageError"
    assert data[5]["valid"].item() is True and data[5]["image"].shape == (3, 32, 32)
    assert data.problem(4, True) == "unreadable: UnidentifiedImageError" and data.problem(5, True) is None
    substitute = TarSamples(spec, 32)
    assert number(substitute[4]["caption"]) == 5 and substitute[4]["skipped"][0][1].startswith("unreadable")
    with pytest.raises(DataError, match="000004.jpg is unreadable"):
        TarSamples(spec, 32, on_bad="raise")[4]


def epoch_batches(stream: TarStream, workers: int, epoch: int = 0, skip: int = 0) -> list[list[int]]:
    stream.set_epoch(epoch, skip)
    loader = torch.utils.data.DataLoader(stream, stream.batch, num_workers=workers, collate_fn=collate_fn,
                                         drop_last=True)
    return [[number(c) for c in batch["caption"]] for batch in loader]


@pytest.mark.parametrize("world, workers", [(1, 0), (1, 2), (2, 2), (3, 1)])
def test_each_epoch_is_split_across_ranks_and_workers_with_equal_batches(tmp_path, world, workers):
    make_shards(tmp_path, [7, 12, 3, 9, 10])  # 41 samples in uneven shards
    spec = str(tmp_path)
    per_rank = []
    for rank in range(world):
        stream = TarStream(spec, 32, seed=1, buffer=4, tokenizer=tokens)
        steps = stream.plan(world, rank, workers, 4)
        per_rank.append(epoch_batches(stream, workers))
        assert len(per_rank[-1]) == steps == max(workers, 1) * (41 // (world * max(workers, 1)) // 4)
    seen = [k for batches in per_rank for batch in batches for k in batch]
    assert len(seen) == len(set(seen))  # no sample twice in an epoch
    slots = world * max(workers, 1)
    assert 41 - len(seen) < slots * 4  # what is left is less than a batch a stream
    again = TarStream(spec, 32, seed=1, buffer=4, tokenizer=tokens)
    again.plan(world, 0, workers, 4)
    assert epoch_batches(again, workers) == per_rank[0]  # deterministic
    assert epoch_batches(again, workers, epoch=1) != per_rank[0]  # a new order each epoch


@pytest.mark.parametrize("workers, done", [(0, 3), (2, 3), (2, 4), (2, 7)])
def test_a_resumed_epoch_reads_what_the_straight_run_would_have_read(tmp_path, workers, done):
    make_shards(tmp_path, [9, 14, 5, 11])
    stream = TarStream(str(tmp_path), 32, seed=3, buffer=6, tokenizer=tokens)
    stream.plan(1, 0, workers, 2)
    straight = epoch_batches(stream, workers, epoch=2)
    assert epoch_batches(stream, workers, epoch=2, skip=done * 2) == straight[done:]


def test_unreadable_samples_in_the_stream_are_skipped_reported_and_replaced(tmp_path):
    make_shards(tmp_path, [10, 10], bad={2: "image", 3: "no-caption", 15: "no-image"})
    stream = TarStream(str(tmp_path), 32, seed=0, buffer=3, tokenizer=tokens)
    steps = stream.plan(1, 0, 2, 3)
    stream.set_epoch(0)
    loader = torch.utils.data.DataLoader(stream, 3, num_workers=2, collate_fn=collate_fn, drop_last=True)
    batches = list(loader)
    assert len(batches) == steps == 6
    skipped = {(where[-6:], reason) for batch in batches for items in batch["skipped"] for where, reason in items}
    # a stream that ran short read its part again to fill its batches: a bad sample may be reported twice
    assert skipped == {("000003", "no caption member (.txt)"), ("000002", "unreadable: UnidentifiedImageError"),
                       ("000015", "no image member (.jpg, .jpeg, .png or .webp)")}
    assert all(batch["image"].shape == (3, 3, 32, 32) for batch in batches)
    assert not {2, 3, 15} & {number(c) for batch in batches for c in batch["caption"]}


def test_too_little_data_for_the_streams_is_a_clear_error(tmp_path):
    make_shards(tmp_path, [5, 4])
    with pytest.raises(DataError, match=r"9 samples in 2 shard\(s\) make 2 for each of 4 streams \(2 process\(es\) x "
                                        r"2 worker\(s\)\), fewer than one batch of 4"):
        TarStream(str(tmp_path), 32).plan(2, 0, 2, 4)


def test_a_resume_past_a_streams_first_reading_goes_on_with_its_second(tmp_path):
    make_shards(tmp_path, [10], bad={3: "no-caption", 7: "no-image"})  # 8 usable samples for 5 batches of 2
    stream = TarStream(str(tmp_path), 32, seed=0, buffer=4, tokenizer=tokens)
    stream.plan(1, 0, 0, 2)
    straight = epoch_batches(stream, 0)
    assert len(straight) == 5 and len({k for batch in straight for k in batch}) == 8
    assert epoch_batches(stream, 0, skip=8) == straight[4:]
