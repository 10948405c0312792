"""Golden CLIP text-tower outputs: open_clip's CLIP.encode_text with QuickGELU and with GELU, on one set
of seeded random weights, written as open_clip writes its hub releases.

Run (see tools/golden/README.md for the reference environment):
    /tmp/golden-venv/bin/python tools/golden/clip_text_tower.py [--check-vit-b-32]
Writes, for a small CLIP (text: context 16, vocabulary 600, width 32, 4 heads, 2 layers; embed 16):
- tests/fixtures/golden/clip_text_tower/open_clip_model.safetensors: the whole model's state dict
  (text and image towers, logit_scale), saved by the safetensors package as open_clip's hub releases
  are; every parameter is perturbed so no LayerNorm weight is 1 and no bias 0;
- tests/fixtures/golden/clip_text_tower.json: the config, token rows, and encode_text's (projected,
  not normalised) outputs of the model built with quick_gelu=True and with quick_gelu=False.
--check-vit-b-32 compares mgpu's clip:ViT-B/32 and clip:ViT-B/32-gelu with open_clip's ViT-B-32 text
tower (quick_gelu True/False) on seeded random weights and real captions, loading an OpenAI-layout
file through mgpu's loader, and prints the largest absolute difference (nothing is written).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from _reference import FIXTURES, mgpu_on_path, open_clip_module, versions

SMALL = {"embed_dim": 16, "text_cfg": {"context_length": 16, "vocab_size": 600, "width": 32, "heads": 4, "layers": 2},
         "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16}}


def perturbed(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Every parameter plus seeded noise (LayerNorm weights near 1, biases near 0 otherwise)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def token_rows(n: int, context: int, vocab: int, seed: int) -> torch.Tensor:
    """Rows as a CLIP tokenizer makes them: start id (vocab - 2), ids, end id (vocab - 1, the largest), zeros."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.zeros(n, context, dtype=torch.long)
    for i in range(n):
        length = context if i == 0 else int(torch.randint(2, context + 1, (1,), generator=g))
        rows[i, 0], rows[i, length - 1] = vocab - 2, vocab - 1
        rows[i, 1: length - 1] = torch.randint(1, vocab - 2, (length - 2,), generator=g)
    return rows


def build(model_module, cfg: dict, quick_gelu: bool) -> torch.nn.Module:
    return model_module.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=quick_gelu).eval()


def write_fixture() -> None:
    from safetensors.torch import save_file

    model_module = open_clip_module("model")
    torch.manual_seed(0)
    quick = build(model_module, SMALL, True)
    state = perturbed(quick, seed=1)
    gelu = build(model_module, SMALL, False)
    gelu.load_state_dict(state)
    text = SMALL["text_cfg"]
    tokens = token_rows(6, text["context_length"], text["vocab_size"], seed=2)
    with torch.no_grad():
        outputs = {"quick_gelu": quick.encode_text(tokens).tolist(), "gelu": gelu.encode_text(tokens).tolist()}
    folder = FIXTURES / "clip_text_tower"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "open_clip_model.safetensors"))
    doc = {"reference": versions(), "config": SMALL, "tokens": tokens.tolist(), "encode_text": outputs}
    (FIXTURES / "clip_text_tower.json").write_text(json.dumps(doc) + "\n")
    diff = (torch.tensor(outputs["quick_gelu"]) - torch.tensor(outputs["gelu"])).abs().max().item()
    print(f"{folder / 'open_clip_model.safetensors'}: {len(state)} tensors; {FIXTURES / 'clip_text_tower.json'}: "
          f"{len(tokens)} rows; QuickGELU and GELU outputs differ by up to {diff:.4f}")


def check_vit_b_32() -> None:
    """mgpu's ViT-B/32 text towers against open_clip's, through mgpu's pretrained loader."""
    mgpu_on_path()
    from mgpu.models import text_encoder
    from mgpu.models.pretrained import load_pretrained
    from mgpu.tokenizers import ClipTokenizer

    model_module = open_clip_module("model")
    config = json.loads((Path(model_module.__file__).parent / "model_configs" / "ViT-B-32.json").read_text())
    config["vision_cfg"] = SMALL["vision_cfg"]  # the image tower plays no part; keep it small
    captions = ["a photo of a cat", "two dogs playing in the snow, 2 of them!", "Ångström ½ ① 中文 😀",
                " ".join(["a long caption"] * 40)]
    tokens = ClipTokenizer.load()(captions)
    torch.manual_seed(0)
    state = perturbed(build(model_module, config, True), seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ViT-B-32.pt"
        torch.save(state, path)  # OpenAI's key layout: token_embedding, transformer.resblocks.N, text_projection
        for quick_gelu, name in ((True, "clip:ViT-B/32"), (False, "clip:ViT-B/32-gelu")):
            reference = build(model_module, config, quick_gelu)
            reference.load_state_dict(state)
            tower = text_encoder(name).eval()
            report = load_pretrained(tower, path)
            with torch.no_grad():
                ours = torch.nn.functional.linear(tower(tokens), report.text_projection)
                theirs = reference.encode_text(tokens)
            print(f"{name} vs open_clip ViT-B-32 (quick_gelu={quick_gelu}): {len(captions)} captions, "
                  f"{tuple(theirs.shape)} features, max abs diff {(ours - theirs).abs().max().item():.3g}")
        other = text_encoder("clip:ViT-B/32-gelu").eval()
        report = load_pretrained(other, path)
        with torch.no_grad():
            wrong = torch.nn.functional.linear(other(tokens), report.text_projection)
            right = build(model_module, config, True)
            right.load_state_dict(state)
            print(f"QuickGELU weights read with GELU: max abs diff {(wrong - right.encode_text(tokens)).abs().max().item():.3g}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check-vit-b-32", action="store_true",
                   help="compare mgpu's ViT-B/32 towers with open_clip's instead of writing the fixture (default: off)")
    args = p.parse_args()
    check_vit_b_32() if args.check_vit_b_32 else write_fixture()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
