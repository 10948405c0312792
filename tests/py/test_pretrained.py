"""Pretrained text weights in OpenAI/open_clip and Hugging Face layouts, written by the tests."""

import pytest
import torch

from mgpu.checkpoint import CheckpointError
from mgpu.models import text_encoder
from mgpu.models.pretrained import load_pretrained


def same(a, b):
    return all(torch.equal(x, b.state_dict()[k]) for k, x in a.state_dict().items())


def openai_style(tower, embed=32):
    state = dict(tower.state_dict())
    state.update({"visual.conv1.weight": torch.zeros(4, 3, 2, 2), "logit_scale": torch.tensor(4.6),
                  "text_projection": torch.arange(tower.out_dim * embed, dtype=torch.float32).view(tower.out_dim, embed)})
    return state


def test_openai_clip_full_state_dict(tmp_path):
    torch.manual_seed(0)
    source = text_encoder("clip:tiny")
    torch.save(openai_style(source), tmp_path / "ViT-B-32.pt")
    target = text_encoder("clip:tiny")
    report = load_pretrained(target, tmp_path / "ViT-B-32.pt")
    assert same(source, target)
    assert report.missing == [] and report.unexpected == [] and report.ignored == 2  # visual.*, logit_scale
    assert report.text_projection.shape == (32, 128)
    assert torch.equal(report.text_projection.T, openai_style(source)["text_projection"])


def test_open_clip_custom_text_prefix_and_wrapped_checkpoint(tmp_path):
    torch.manual_seed(1)
    source = text_encoder("clip:tiny")
    state = {f"module.text.{k}": v for k, v in source.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "epoch_3.pt")
    target = text_encoder("clip:tiny")
    assert load_pretrained(target, tmp_path / "epoch_3.pt").missing == []
    assert same(source, target)


def test_hugging_face_bert_folder_with_old_layer_norm_names(tmp_path):
    torch.manual_seed(2)
    source = text_encoder("bert:tiny-chinese")
    state = {}
    for key, value in source.state_dict().items():
        key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        state[f"bert.{key}"] = value
    state["bert.embeddings.position_ids"] = torch.arange(512)[None]
    state["cls.predictions.bias"] = torch.zeros(21128)
    folder = tmp_path / "bert-base-chinese"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    target = text_encoder("bert:tiny-chinese")
    report = load_pretrained(target, folder)
    assert same(source, target)
    assert report.missing == [] and report.unexpected == [] and report.ignored == 2


def test_missing_keys_are_reported_and_a_wrong_encoder_is_an_error(tmp_path):
    state = openai_style(text_encoder("clip:tiny"))
    del state["ln_final.bias"]
    torch.save(state, tmp_path / "partial.pt")
    assert load_pretrained(text_encoder("clip:tiny"), tmp_path / "partial.pt").missing == ["ln_final.bias"]
    with pytest.raises(CheckpointError, match=r"partial.pt: \S+ has shape \(\d+, 128\), this model needs \(\d+, 512\): is it the right encoder\?"):
        load_pretrained(text_encoder("clip:ViT-B/32"), tmp_path / "partial.pt")


def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="no open_clip_model.safetensors, open_clip_pytorch_model.bin, "
                                              "model.safetensors or pytorch_model.bin in it"):
        load_pretrained(text_encoder("bert:tiny-chinese"), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_pretrained(text_encoder("bert:tiny-chinese"), tmp_path)


def test_official_starnet_release_loads_key_for_key_and_its_head_is_ignored(tmp_path):
    from mgpu.models import image_encoder
    from mgpu.models.starnet import starnet

    source = starnet("starnet_s050", num_classes=1000)  # the release's layout: ConvBN conv/bn and a head
    assert "stem.0.conv.weight" in source.state_dict() and "stages.0.1.dwconv.bn.running_mean" in source.state_dict()
    torch.save({"state_dict": source.state_dict(), "epoch": 300}, tmp_path / "starnet_s050.pth.tar")
    target = image_encoder("starnet_s050")
    report = load_pretrained(target, tmp_path / "starnet_s050.pth.tar")
    assert report.missing == [] and report.unexpected == [] and report.ignored == 2  # head.weight, head.bias
    for key, value in target.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key
    with pytest.raises(CheckpointError, match="holds no weights of a StarNet"):
        load_pretrained(image_encoder("starnet_s050"), _saved(tmp_path, {"head.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"starnet_s050.pth.tar: stages\.\S+ has shape .* is it the right encoder"):
        load_pretrained(image_encoder("starnet_s1"), tmp_path / "starnet_s050.pth.tar")


def _saved(tmp_path, state):
    torch.save(state, tmp_path / "other.pt")
    return tmp_path / "other.pt"
