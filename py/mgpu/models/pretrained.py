"""Pretrained tower weights from local files, in the layouts people have (``--image-pretrained``,
``--text-pretrained``):

- StarNet: the official release (``starnet_s1.pth.tar``: ``{"state_dict": ...}``, ConvBN's ``conv``/``bn``
  names, an ImageNet ``head`` that is ignored), or a ``visual.``-prefixed CLIP image tower;

- OpenAI CLIP / open_clip: a full CLIP state dict (``token_embedding``, ``positional_embedding``,
  ``transformer.resblocks.N...``, ``ln_final``, ``text_projection``, ``visual.*``), also under a ``text.``
  prefix (open_clip's CustomTextCLIP) or inside ``{"state_dict": ...}``;
- Hugging Face BERT: ``pytorch_model.bin`` or ``model.safetensors`` (``bert.`` prefix, old
  ``LayerNorm.gamma/beta`` names, the MLM head ``cls.*`` ignored).

Keys of other parts (the image tower, heads) are counted as ignored, not unexpected. The text projection
comes back separately, in nn.Linear's layout, for the CLIP head. Nothing is downloaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import CheckpointError, clean_state_dict, read_checkpoint
from .starnet import StarNet
from .text import BertTower, ClipTextTower

log = logging.getLogger(__name__)
_CLIP_TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.")


@dataclass
class PretrainedReport:
    path: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: int = 0
    text_projection: torch.Tensor | None = None  # (embed_dim, width): nn.Linear's weight layout


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise CheckpointError(f"{path}: no model.safetensors, pytorch_model.bin or open_clip_pytorch_model.bin in it")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CheckpointError(f"{path}: reading .safetensors needs the safetensors package "
                                  "(pip install safetensors)") from None
        return load_file(str(path), device="cpu")
    state = read_checkpoint(path)
    return state.get("state_dict", state) if isinstance(state.get("state_dict"), dict) else state


def _clip_text(state: dict[str, torch.Tensor], report: PretrainedReport) -> dict[str, torch.Tensor]:
    state = clean_state_dict(state)
    if any(k.startswith("text.transformer.") for k in state):
        state = {k[len("text."):] if k.startswith("text.") else k: v for k, v in state.items()}
    mapped = {}
    for key, value in state.items():
        if key.startswith(_CLIP_TEXT_KEYS):
            mapped[key] = value
        elif key == "text_projection":
            report.text_projection = value.T.contiguous()  # OpenAI multiplies x @ P; Linear stores P.T
        else:
            report.ignored += 1
    return mapped


def _select(state: dict[str, torch.Tensor], report: PretrainedReport, prefix: str, keep: tuple[str, ...],
            rename=lambda key: key) -> dict[str, torch.Tensor]:
    """The tensors whose key, without wrapper prefixes and prefix, renamed, starts with one of keep; the
    rest are counted as ignored (heads, other towers, BERT's position_ids buffer)."""
    mapped = {}
    for key, value in clean_state_dict(state).items():
        key = rename(key.removeprefix(prefix))
        if key.startswith(keep) and not key.endswith("position_ids"):
            mapped[key] = value
        else:
            report.ignored += 1
    return mapped


def _hf_bert(state: dict[str, torch.Tensor], report: PretrainedReport) -> dict[str, torch.Tensor]:
    return _select(state, report, "bert.", ("embeddings.", "encoder.", "pooler."),
                   lambda key: key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"))


def _starnet(state: dict[str, torch.Tensor], report: PretrainedReport) -> dict[str, torch.Tensor]:
    return _select(state, report, "visual.", ("stem.", "stages.", "norm."))


def load_pretrained(tower: nn.Module, path: str | Path) -> PretrainedReport:
    """Load a local pretrained file into a tower (--image-pretrained / --text-pretrained); shape
    mismatches are errors naming the key."""
    report = PretrainedReport(str(path))
    state = read_weights(path)
    if isinstance(tower, ClipTextTower):
        mapped = _clip_text(state, report)
    elif isinstance(tower, BertTower):
        mapped = _hf_bert(state, report)
    elif isinstance(tower, StarNet):
        mapped = _starnet(state, report)
    else:
        raise TypeError(f"no pretrained layout known for {type(tower).__name__}")
    if not mapped:
        raise CheckpointError(f"{path}: holds no weights of a {type(tower).__name__} "
                              f"({report.ignored} keys of other parts): is it the right file?")
    own = tower.state_dict()
    for key, value in mapped.items():
        if key in own and own[key].shape != value.shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(value.shape)}, this model needs "
                                  f"{tuple(own[key].shape)}: is it the right encoder?")
    result = tower.load_state_dict(mapped, strict=False)
    report.missing, report.unexpected = list(result.missing_keys), list(result.unexpected_keys)
    report.loaded = len(mapped) - len(report.unexpected)
    log.info("%s: loaded %d tensors; missing %d %s; unexpected %d %s; ignored %d of other parts", path,
             report.loaded, len(report.missing), report.missing[:5], len(report.unexpected),
             report.unexpected[:5], report.ignored)
    return report
