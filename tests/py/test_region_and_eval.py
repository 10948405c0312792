"""Region pooling and the region loss; evaluation shards and the variable-length gather over real gloo
processes; the TensorBoard writer's framing."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mgpu.clip import region_loss, region_pool
from mgpu.evaluate import gather_varlen, shard, val_loss
from mgpu.tensorboard import crc32c


def test_region_pool_averages_the_cells_inside_each_box():
    fmap = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)  # 32 px image: cells of 8 px
    boxes = torch.tensor([[[0, 0, 16, 16], [16, 16, 32, 32], [9, 9, 10, 10]]], dtype=torch.float32)
    pooled = region_pool(fmap, boxes, 32)[0, :, 0]
    assert pooled.tolist() == [(0 + 1 + 4 + 5) / 4, (10 + 11 + 14 + 15) / 4, 5.0]  # a tiny box: its centre cell


def test_region_loss_treats_boxes_with_the_same_phrase_as_positives():
    phrases = torch.tensor([[[5, 6], [5, 6], [7, 0]]])
    mask = torch.tensor([[True, True, True]])
    aligned = torch.nn.functional.normalize(torch.tensor([[[1.0, 0], [1.0, 0], [0, 1.0]]]), dim=-1)
    good = region_loss(aligned, aligned, phrases, mask, torch.tensor([50.0]))
    crossed = region_loss(aligned, aligned.flip(1), phrases, mask, torch.tensor([50.0]))
    assert good.item() < 1e-6 < 1 < crossed.item()  # the two same-phrase boxes are not each other's negatives
    none = region_loss(aligned, aligned, phrases, torch.zeros_like(mask), torch.tensor([50.0]))
    assert none.item() == 0


def test_shards_cover_every_sample_once():
    for n in (0, 1, 13, 100):
        for world in (1, 2, 3, 8):
            parts = [list(shard(n, r, world)) for r in range(world)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def _gather(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        part = torch.arange(rank * 10, rank * 10 + rank + 1, dtype=torch.float32)[:, None].repeat(1, 2)
        out[rank] = gather_varlen(part)
    finally:
        dist.destroy_process_group()


def test_gather_varlen_joins_shards_of_different_lengths_in_rank_order():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_gather, args=(3, port, out), nprocs=3, join=True)
        results = dict(out)
    expected = [0, 10, 11, 20, 21, 22]
    for rank in range(3):
        assert results[rank][:, 0].tolist() == expected and results[rank].shape == (6, 2)


def test_val_loss_is_the_mean_over_samples_of_batch_losses():
    from mgpu.clip import clip_loss

    g = torch.Generator().manual_seed(0)
    img, txt = (torch.nn.functional.normalize(torch.randn(5, 3, generator=g), dim=-1) for _ in range(2))
    scale = torch.tensor(10.0)
    expected = (clip_loss(img[:2], txt[:2], scale) * 2 + clip_loss(img[2:4], txt[2:4], scale) * 2
                 + clip_loss(img[4:], txt[4:], scale)) / 5
    assert abs(val_loss(img, txt, 10.0, 2) - expected.item()) < 1e-6
    assert abs(val_loss(img, txt, 10.0, 5) - clip_loss(img, txt, scale).item()) < 1e-6


def test_crc32c_is_castagnoli():
    assert crc32c(b"123456789") == 0xE3069283 and crc32c(b"") == 0
