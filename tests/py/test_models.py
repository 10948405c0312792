"""The encoders: published parameter counts, shapes, and the behaviours that matter for CLIP training."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from mgpu.models import UnknownEncoder, count_parameters, image_encoder, text_encoder
from mgpu.models.starnet import StarNet, SPECS

PUBLISHED_M = {"starnet_s1": 2.87, "starnet_s2": 3.68, "starnet_s3": 5.75, "starnet_s4": 7.48,
               "starnet_s050": 0.54, "starnet_s100": 1.04, "starnet_s150": 1.56}


@pytest.mark.parametrize("name,millions", PUBLISHED_M.items())
def test_starnet_matches_the_published_parameter_count_with_a_1000_class_head(name, millions):
    with torch.device("meta"):
        model = StarNet(SPECS[name], num_classes=1000)
    assert round(count_parameters(model) / 1e6, 2) == millions


def test_clip_text_tower_with_its_projection_is_63_4_m():
    with torch.device("meta"):
        tower = text_encoder("clip:ViT-B/32")
    assert tower.out_dim == 512
    assert round((count_parameters(tower) + 512 * 512) / 1e6, 1) == 63.4


def test_bert_base_chinese_is_about_102_m():
    with torch.device("meta"):
        bert = text_encoder("bert-base-chinese")
    assert 101.5e6 < count_parameters(bert) < 102.5e6
    assert bert.embeddings.word_embeddings.num_embeddings == 21128 and len(bert.encoder.layer) == 12


def test_starnet_features_and_map():
    torch.manual_seed(0)
    model = image_encoder("starnet_s050").eval()
    images = torch.randn(2, 3, 64, 64)
    assert model(images).shape == (2, 128)
    assert model.forward_map(images).shape == (2, 128, 2, 2)  # stride 32


def test_drop_path_only_in_training():
    model = image_encoder("starnet_s4")
    assert max(b.drop_path.p for stage in model.stages for b in stage[1:]) == pytest.approx(0.1)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(model(x), model(x))


def clip_tokens(lengths, context=77, vocab=49408):
    """Rows of random ids below the start token, each ending in the end token (the largest id)."""
    rows = torch.zeros(len(lengths), context, dtype=torch.long)
    for i, n in enumerate(lengths):
        rows[i, 0] = vocab - 2
        rows[i, 1:n - 1] = torch.randint(1, vocab - 2, (n - 2,))
        rows[i, n - 1] = vocab - 1
    return rows


def test_clip_text_reads_the_end_token_and_never_looks_ahead():
    torch.manual_seed(0)
    tower = text_encoder("clip:tiny").eval()
    tokens = clip_tokens([5, 9])
    out = tower(tokens)
    assert out.shape == (2, 128)
    after = tokens.clone()
    after[0, 5:] = 7  # tokens after the end token must not change the feature (causal mask)
    assert torch.allclose(tower(after)[0], out[0], atol=1e-6)
    before = tokens.clone()
    before[0, 2] = 11  # a token before it must
    assert not torch.allclose(tower(before)[0], out[0], atol=1e-4)


def test_clip_text_refuses_text_longer_than_its_context():
    with pytest.raises(ValueError, match="longer than the context of 77"):
        text_encoder("clip:tiny")(torch.ones(1, 78, dtype=torch.long))


@pytest.mark.parametrize("pooling", ["pooler", "mean", "cls"])
def test_bert_ignores_padding(pooling):
    from mgpu.models.text import BertSpec, BertTower

    torch.manual_seed(0)
    bert = BertTower(BertSpec(hidden=32, layers=2, heads=2, intermediate=64, pooling=pooling)).eval()
    ids = torch.tensor([[101, 2769, 4263, 102, 0, 0], [101, 1920, 102, 0, 0, 0]])
    out = bert(ids)
    assert out.shape == (2, 32)
    assert (out.abs().max() <= 1) == (pooling == "pooler")  # tanh pooler; the hidden states are unbounded
    assert torch.allclose(bert(ids[:, :4])[0], out[0], atol=1e-5)  # fewer pads, same feature
    assert hasattr(bert, "pooler") == (pooling == "pooler")


def test_bert_tiny_chinese_is_made_to_train_from_scratch():
    """Mean pooling over the real tokens, PyTorch's initialisation, no dropout (docs/training.md)."""
    from mgpu.models.text import BertSpec

    torch.manual_seed(0)
    bert = text_encoder("bert:tiny-chinese")
    assert (bert.spec.pooling, bert.spec.init, bert.spec.dropout) == ("mean", "torch", 0.0)
    ids = torch.tensor([[101, 2769, 4263, 102, 0, 0]])
    hidden = bert.embeddings(ids)
    for layer in bert.encoder.layer:
        hidden = layer(hidden, (ids != 0)[:, None, None, :])
    assert torch.allclose(bert(ids)[0], hidden[0, :4].mean(0), atol=1e-6)
    assert bert.embeddings.word_embeddings.weight.std() > 0.5  # N(0, 1), not BERT's std 0.02
    with pytest.raises(ValueError, match="pooling 'max': allowed pooler, mean, cls"):
        BertSpec(hidden=8, layers=1, heads=1, intermediate=8, pooling="max")


def test_every_parameter_gets_a_gradient():
    # DDP needs every parameter in the graph (or find_unused_parameters, which costs time).
    for model, x in ((image_encoder("starnet_s050"), torch.randn(2, 3, 64, 64)),
                     (text_encoder("clip:tiny"), clip_tokens([4, 6])),
                     (text_encoder("bert:tiny-chinese"), torch.tensor([[101, 5, 102], [101, 6, 102]]))):
        model(x).sum().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert missing == [], missing


def test_unknown_names_list_the_known_ones():
    with pytest.raises(UnknownEncoder, match="unknown image encoder 'resnet50'; known: starnet_s050, "):
        image_encoder("resnet50")
    with pytest.raises(UnknownEncoder, match=r"known: clip:ViT-B/32, clip:ViT-B/32-gelu, clip:tiny, clip:tiny-gelu, "
                                             r"bert-base-chinese, bert:tiny-chinese"):
        text_encoder("clip:ViT-L/14")


def test_python_m_mgpu_models_lists_every_encoder():
    done = subprocess.run([sys.executable, "-m", "mgpu.models", "--json"], capture_output=True, text=True,
                          cwd=ROOT / "py", check=True, timeout=120)
    table = {r["name"]: r for r in json.loads(done.stdout)}
    assert set(table) == set(PUBLISHED_M) | {"clip:ViT-B/32", "clip:ViT-B/32-gelu", "clip:tiny", "clip:tiny-gelu",
                                             "bert-base-chinese", "bert:tiny-chinese"}
    assert table["clip:ViT-B/32"]["parameters"] == table["clip:ViT-B/32-gelu"]["parameters"] == 63_165_952
    assert table["starnet_s1"]["out_dim"] == 192


@pytest.mark.parametrize("name,ids", [
    ("clip:tiny", clip_tokens([4, 9, 77])),
    ("clip:tiny-gelu", clip_tokens([5, 12, 30])),
    ("bert:tiny-chinese", torch.tensor([[101, 2769, 4263, 102, 0, 0], [101, 1920, 6, 7, 8, 102]])),
])
def test_grad_checkpointing_gives_the_same_loss_and_gradients(name, ids):
    """Recomputing each block in the backward pass changes memory, not results (BERT's dropout included:
    the RNG state is replayed)."""
    def run(checkpointing: bool):
        torch.manual_seed(0)
        tower = text_encoder(name).train()
        tower.set_grad_checkpointing(checkpointing)
        torch.manual_seed(1)
        loss = tower(ids).pow(2).mean()
        loss.backward()
        return loss.item(), {n: p.grad for n, p in tower.named_parameters()}

    loss, grads = run(False)
    loss_ckpt, grads_ckpt = run(True)
    assert abs(loss - loss_ckpt) <= 1e-6
    assert max((grads[n] - grads_ckpt[n]).abs().max().item() for n in grads) <= 1e-6


def test_grad_checkpointing_recomputes_blocks_only_while_training(monkeypatch):
    from mgpu.models import text

    calls = []
    real = text.checkpoint
    monkeypatch.setattr(text, "checkpoint", lambda *a, **k: calls.append(k) or real(*a, **k))
    tower = text_encoder("clip:tiny")
    tower.set_grad_checkpointing()
    tower.train()(clip_tokens([4]))
    assert len(calls) == 2 and all(k == {"use_reentrant": False} for k in calls)  # one per block
    with torch.no_grad():
        tower(clip_tokens([4]))
    tower.eval()(clip_tokens([4]))
    tower.set_grad_checkpointing(False)
    tower.train()(clip_tokens([4]))
    assert len(calls) == 2
