"""The CLIP text tower against open_clip's, on the golden fixture open_clip wrote
(tools/golden/clip_text_tower.py): a folder holding only open_clip_model.safetensors, as open_clip's hub
releases name it, read by mgpu's own safetensors reader, and encode_text's outputs with QuickGELU and
with GELU. Also the reader on every dtype (tools/golden/safetensors_dtypes.py), its errors, the
open_clip_config.json check and OpenAI's TorchScript release layout."""

import json
import shutil
import struct

import pytest
import torch

from conftest import ROOT
from mgpu.checkpoint import CheckpointError
from mgpu.models import text_encoder
from mgpu.models.pretrained import load_pretrained, read_safetensors
from mgpu.models.text import ClipTextSpec, ClipTextTower

GOLDEN = ROOT / "tests" / "fixtures" / "golden"
FOLDER = GOLDEN / "clip_text_tower"
DOC = json.loads((GOLDEN / "clip_text_tower.json").read_text())


def small_tower(activation: str) -> ClipTextTower:
    text = DOC["config"]["text_cfg"]
    spec = ClipTextSpec(width=text["width"], layers=text["layers"], heads=text["heads"],
                        context=text["context_length"], vocab=text["vocab_size"], activation=activation)
    return ClipTextTower(spec).eval()


def encode_text(tower: ClipTextTower, folder) -> torch.Tensor:
    report = load_pretrained(tower, folder)
    assert report.missing == [] and report.unexpected == [] and report.text_projection is not None
    with torch.no_grad():
        return torch.nn.functional.linear(tower(torch.tensor(DOC["tokens"])), report.text_projection)


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_text_tower_equals_open_clips_encode_text(activation):
    assert sorted(p.name for p in FOLDER.iterdir()) == ["open_clip_model.safetensors"]  # the folder alone
    expected = torch.tensor(DOC["encode_text"][activation])
    ours = encode_text(small_tower(activation), FOLDER)
    assert ours.shape == expected.shape == (6, DOC["config"]["embed_dim"])
    assert (ours - expected).abs().max().item() < 1e-5


def test_the_activation_matters_so_the_test_can_tell_them_apart():
    quick, gelu = (torch.tensor(DOC["encode_text"][a]) for a in ("quick_gelu", "gelu"))
    assert (quick - gelu).abs().max().item() > 1e-2
    assert (encode_text(small_tower("gelu"), FOLDER) - quick).abs().max().item() > 1e-2


def test_encoder_names_choose_the_activation():
    assert isinstance(text_encoder("clip:tiny").transformer.resblocks[0].mlp.gelu, type(
        text_encoder("clip:ViT-B/32").transformer.resblocks[0].mlp.gelu))
    assert text_encoder("clip:tiny").spec.activation == "quick_gelu"
    assert isinstance(text_encoder("clip:tiny-gelu").transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    with torch.device("meta"):
        assert text_encoder("clip:ViT-B/32-gelu").spec.activation == "gelu"
    with pytest.raises(ValueError, match="CLIP text activation 'relu': must be one of quick_gelu, gelu"):
        ClipTextSpec(width=8, layers=1, heads=1, activation="relu")


def test_open_clip_config_must_agree_with_the_activation(tmp_path):
    folder = tmp_path / "hub folder"
    shutil.copytree(FOLDER, folder)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {**DOC["config"], "quick_gelu": True}}))
    with pytest.raises(CheckpointError, match=r"open_clip_config.json says quick_gelu=True, but this text encoder "
                                              r"uses GELU; choose one with QuickGELU \(a clip: name without -gelu"):
        load_pretrained(small_tower("gelu"), folder)
    assert load_pretrained(small_tower("quick_gelu"), folder).missing == []
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": DOC["config"]}))  # no quick_gelu: GELU
    with pytest.raises(CheckpointError, match=r"says quick_gelu=False, but this text encoder uses QuickGELU; "
                                              r"choose one with GELU \(a clip: name ending in -gelu"):
        load_pretrained(small_tower("quick_gelu"), folder / "open_clip_model.safetensors")


def test_safetensors_reader_gives_what_the_safetensors_package_wrote():
    expected = json.loads((GOLDEN / "safetensors_dtypes.json").read_text())
    state = read_safetensors(GOLDEN / "safetensors_dtypes.safetensors")
    assert set(state) == set(expected)
    for name, want in expected.items():
        got = state[name]
        assert str(got.dtype) == f"torch.{want['dtype']}" and list(got.shape) == want["shape"], name
        values = got.float().flatten().tolist() if got.is_floating_point() else got.flatten().tolist()
        assert values == want["values"], name


def _safetensors(path, header: dict, data: bytes = b"") -> str:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


def test_bad_safetensors_files_are_named_with_what_is_wrong(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(CheckpointError, match=r"x.safetensors: not a readable safetensors file \(ValueError: a header "
                                              r"of 1000 bytes in a file of 10\)"):
        read_safetensors(tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match=r"tensor w: data_offsets \[0, 12\] do not hold shape \[2, 2\] of F32"):
        read_safetensors(_safetensors(tmp_path / "y.safetensors", {"w": {"dtype": "F32", "shape": [2, 2],
                                                                         "data_offsets": [0, 12]}}, bytes(12)))
    with pytest.raises(CheckpointError, match=r"tensor w has dtype 'F8_E4M3'; mgpu reads F64, F32"):
        read_safetensors(_safetensors(tmp_path / "z.safetensors", {"w": {"dtype": "F8_E4M3", "shape": [1],
                                                                         "data_offsets": [0, 1]}}, bytes(1)))
    with pytest.raises(CheckpointError, match=r"not a readable safetensors file \(KeyError"):
        read_safetensors(_safetensors(tmp_path / "k.safetensors", {"w": {"dtype": "F32"}}))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.trace:DeprecationWarning")
def test_openai_torchscript_release_layout(tmp_path):
    torch.manual_seed(3)
    source = small_tower("quick_gelu")
    archive = torch.jit.trace(source, torch.tensor(DOC["tokens"]), check_trace=False)
    archive.save(str(tmp_path / "ViT-tiny.pt"))
    target = small_tower("quick_gelu")
    report = load_pretrained(target, tmp_path / "ViT-tiny.pt")
    assert report.missing == [] and report.loaded == len(source.state_dict())
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in source.state_dict().items())
