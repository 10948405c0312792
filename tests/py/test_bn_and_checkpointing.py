"""BatchNorm modes and statistics: evaluation gives every module its own mode back (--freeze-bn survives
--eval-every), a repeated forward leaves running statistics alone, and activation checkpointing changes
neither outputs, gradients nor statistics (StarNet here; the text towers when they offer it)."""

import copy

import pytest
import torch
from torch import nn

from mgpu.bn import running_stats_kept, set_train_mode
from mgpu.clip import CLIP
from mgpu.evaluate import evaluate
from mgpu.models import image_encoder, text_encoder
from mgpu.models.starnet import starnet


def tiny_clip(text: str = "clip:tiny") -> CLIP:
    torch.manual_seed(0)
    return CLIP(image_encoder("starnet_s050"), text_encoder(text), embed_dim=16)


def batches(n: int = 2, size: int = 4):
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        tokens = torch.randint(1, 300, (size, 6), generator=g)
        tokens[:, -1] = 49407
        out.append({"image": torch.rand(size, 3, 32, 32, generator=g), "tokens": tokens,
                    "index": torch.arange(i * size, (i + 1) * size)})
    return out


def bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_evaluation_gives_every_module_its_own_mode_back_so_frozen_batchnorm_stays_frozen():
    model = tiny_clip()
    set_train_mode(model, freeze_bn=True)
    assert model.training and not any(m.training for m in bn_layers(model))
    evaluate(model, batches(), torch.device("cpu"), batch_size=4)
    assert model.training and model.visual.stages.training  # the rest trains again
    assert not any(m.training for m in bn_layers(model))  # --freeze-bn survived the evaluation
    before = [m.running_mean.clone() for m in bn_layers(model)]
    img, txt, scale = model(batches()[0]["image"], batches()[0]["tokens"])[:3]
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, bn_layers(model)))


def test_a_locked_towers_batchnorm_is_frozen_with_it():
    model = tiny_clip()
    model.lock_image_tower(unlocked=1)
    set_train_mode(model, freeze_bn=False)
    last_block = model.visual.stages[-1][-1]
    unlocked = set(bn_layers(last_block)) | {model.visual.norm}
    assert unlocked and all(m.training for m in unlocked)
    assert all(not m.training for m in bn_layers(model) if m not in unlocked)


def test_running_stats_kept_normalises_with_the_batch_but_leaves_statistics_alone():
    bn = nn.BatchNorm2d(3).train()
    x = torch.randn(4, 3, 5, 5) * 3 + 1
    expected = bn(x)  # one update
    saved = {k: v.clone() for k, v in bn.state_dict().items()}
    with running_stats_kept(bn):
        again = bn(x)
    assert torch.equal(again, expected)
    assert all(torch.equal(saved[k], v) for k, v in bn.state_dict().items())
    assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == 1


@pytest.mark.parametrize("name", ["starnet_s050", "starnet_s4"])  # s4: drop-path, replayed in the recomputation
def test_starnet_checkpointing_keeps_outputs_gradients_and_batchnorm_statistics(name):
    torch.manual_seed(0)
    plain = starnet(name)
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing()
    x = torch.randn(3, 3, 64, 64)
    results = []
    for model in (plain, checkpointed):
        torch.manual_seed(5)
        out = model(x)
        out.square().sum().backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}, dict(model.named_buffers())))
    (out_a, grads_a, bufs_a), (out_b, grads_b, bufs_b) = results
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    assert all(torch.equal(bufs_a[n], bufs_b[n]) for n in bufs_a)  # num_batches_tracked 1, not 2


def test_starnet_checkpointing_saves_memory_for_activations():
    def saved_bytes(model):
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.randn(8, 3, 64, 64)).sum()
        return sum(total)
    plain = starnet("starnet_s1")
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing()
    assert saved_bytes(checkpointed) < saved_bytes(plain) / 2


def test_clip_turns_checkpointing_on_in_each_tower_that_offers_it():
    model = tiny_clip()
    towers = model.set_grad_checkpointing(True)
    assert "image" in towers and model.visual.grad_checkpointing
    assert towers == ["image"] + (["text"] if hasattr(model.text, "set_grad_checkpointing") else [])


@pytest.mark.parametrize("text", ["clip:tiny", "bert:tiny-chinese"])
def test_text_tower_checkpointing_keeps_gradients(text):
    tower = text_encoder(text)
    if not callable(getattr(tower, "set_grad_checkpointing", None)):
        pytest.skip(f"{text}: the text tower has no set_grad_checkpointing (mgpu.models.text)")
    torch.manual_seed(0)
    plain = tiny_clip(text)
    checkpointed = copy.deepcopy(plain)
    assert checkpointed.set_grad_checkpointing(True) == ["image", "text"]
    tokens = torch.randint(1, 100, (4, 7))
    tokens[:, 0], tokens[:, -1] = 101, 49407 if text.startswith("clip") else 102
    grads = []
    for model in (plain, checkpointed):
        model.train()
        torch.manual_seed(5)  # the same dropout masks: the recomputation replays them
        model.encode_text(tokens).square().sum().backward()
        grads.append({n: p.grad for n, p in model.text.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])
