"""``python -m mgpu.train_clip --text-encoder clip:... --text-pretrained <OpenAI-layout file>`` reads
captions as CLIP does: the tokenizer it trains with, and saves for inference, gives open_clip's ids on
every golden string, and the file's weights are what the text tower starts from."""

import gzip
import json

import torch

from conftest import ROOT
from mgpu import train_clip
from mgpu.checkpoint import read_checkpoint
from mgpu.models import text_encoder
from mgpu.tokenizers import ClipTokenizer

# --device cpu: the same one step on every machine (where there is a GPU the default, auto, would take it)
ARGS = ["--image-encoder", "starnet_s050", "--embed-dim", "32", "--image-size", "32", "--train-size", "16",
        "--val-size", "8", "--batch-size", "8", "--workers", "0", "--warmup", "0", "--lr", "1e-12",
        "--weight-decay", "0", "--max-steps", "1", "--no-tb", "--device", "cpu"]


def openai_layout(tower: torch.nn.Module, embed_dim: int) -> dict[str, torch.Tensor]:
    """A whole CLIP state dict as OpenAI's ViT-B-32.pt holds it: text tower keys at the top level,
    text_projection (width, embed_dim), the image tower under visual., logit_scale."""
    state = dict(tower.state_dict())
    state["text_projection"] = torch.randn(tower.out_dim, embed_dim)
    state.update({"visual.conv1.weight": torch.randn(8, 3, 4, 4), "logit_scale": torch.tensor(4.6052)})
    return state


def test_training_from_openai_weights_reads_captions_as_open_clip(tmp_path):
    torch.manual_seed(5)
    source = text_encoder("clip:tiny")
    state = openai_layout(source, 32)
    torch.save(state, tmp_path / "ViT-tiny.pt")
    out = tmp_path / "run"
    assert train_clip.main([*ARGS, "--text-encoder", "clip:tiny", "--text-pretrained", str(tmp_path / "ViT-tiny.pt"),
                            "--output-dir", str(out)]) == 0
    (checkpoint,) = out.glob("checkpoint_*.pt")
    saved = read_checkpoint(checkpoint)
    model = saved["model"]
    for key, value in source.state_dict().items():  # the tower started from the file (lr 1e-12: unchanged)
        assert torch.allclose(model[f"text.{key}"], value, atol=1e-6), key
    assert torch.allclose(model["text_projection.weight"], state["text_projection"].T, atol=1e-6)

    tokenizer_state = saved["config"]["tokenizer"]
    assert tokenizer_state["kind"] == "clip" and len(tokenizer_state["merges"]) == 48894
    tokenizer = ClipTokenizer([tuple(m) for m in tokenizer_state["merges"]])  # as mgpu.infer rebuilds it
    with gzip.open(ROOT / "tests" / "fixtures" / "golden" / "clip_tokens.json.gz", "rt", encoding="utf-8") as f:
        golden = json.load(f)["cases"]
    rows = tokenizer([text for text, _ in golden]).tolist()
    differ = [text for (text, ids), row in zip(golden, rows) if row != ids + [0] * (77 - len(ids))]
    assert not differ, f"{len(differ)} of {len(golden)} strings differ from open_clip, e.g. {differ[:3]}"
