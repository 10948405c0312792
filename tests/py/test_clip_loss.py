"""The CLIP loss gives one process's loss and gradient on the global batch when split over real gloo
processes; the model's scale and features; retrieval metrics on known rankings."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mgpu.clip import CLIP, LOGIT_SCALE_MAX, clip_loss
from mgpu.metrics import retrieval_metrics
from mgpu.models import image_encoder, text_encoder


def features(n=16, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    norm = torch.nn.functional.normalize
    return norm(torch.randn(n, d, generator=g), dim=-1), norm(torch.randn(n, d, generator=g), dim=-1)


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        img, txt = features()
        per = img.shape[0] // world
        img = img[rank * per:(rank + 1) * per].clone().requires_grad_()
        txt = txt[rank * per:(rank + 1) * per].clone().requires_grad_()
        loss = clip_loss(img, txt, torch.tensor(10.0))
        loss.backward()
        out[rank] = (loss.item(), img.grad.clone(), txt.grad.clone())
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process_on_the_global_batch():
    img, txt = features()
    img.requires_grad_(), txt.requires_grad_()
    full = clip_loss(img, txt, torch.tensor(10.0))
    full.backward()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, free_port(), out), nprocs=2, join=True)
        results = dict(out)
    assert (results[0][0] + results[1][0]) / 2 == pytest.approx(full.item(), abs=1e-6)
    # each rank's gradient is the sum over ranks; DDP's averaging divides it by the world size
    got_img = torch.cat([results[r][1] for r in (0, 1)]) / 2
    got_txt = torch.cat([results[r][2] for r in (0, 1)]) / 2
    assert torch.allclose(got_img, img.grad, atol=1e-6) and torch.allclose(got_txt, txt.grad, atol=1e-6)


def test_single_process_loss_is_symmetric_infonce():
    img, txt = features(4)
    logits = 10 * img @ txt.T
    expected = (torch.nn.functional.cross_entropy(logits, torch.arange(4))
                + torch.nn.functional.cross_entropy(logits.T, torch.arange(4))) / 2
    assert clip_loss(img, txt, torch.tensor(10.0)).item() == pytest.approx(expected.item())


def test_model_scale_starts_at_1_over_0_07_and_is_clamped_at_100():
    model = CLIP(image_encoder("starnet_s050"), text_encoder("clip:tiny"), embed_dim=32).eval()
    tokens = torch.zeros(2, 77, dtype=torch.long)
    tokens[:, 0], tokens[:, 3] = 49406, 49407
    img, txt, scale, regions, phrases = model(torch.randn(2, 3, 64, 64), tokens)
    assert regions is None and phrases is None  # no boxes given
    assert img.shape == txt.shape == (2, 32)
    assert torch.allclose(img.norm(dim=-1), torch.ones(2)) and scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model(torch.randn(2, 3, 64, 64), tokens).scale.item() == pytest.approx(math.exp(LOGIT_SCALE_MAX))


def test_retrieval_metrics_on_known_rankings():
    eye = torch.eye(4)
    perfect = retrieval_metrics(eye, eye)
    assert perfect["image_to_text_R@1"] == 1 and perfect["text_to_image_median_rank"] == 1
    shifted = retrieval_metrics(eye, eye + 2 * eye.roll(1, dims=0))  # every true match scores 1, another 2, no ties
    assert shifted["image_to_text_R@1"] == 0 and shifted["image_to_text_mean_rank"] == 2
    assert shifted["image_to_text_R@5"] == 1 and 0 < shifted["mean_recall"] < 1
    with pytest.raises(ValueError, match="differ in shape"):
        retrieval_metrics(eye, torch.eye(3))
