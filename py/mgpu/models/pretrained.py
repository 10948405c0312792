"""Pretrained tower weights from local files, in the layouts people have (``--image-pretrained``,
``--text-pretrained``):

- StarNet: the official release (``starnet_s1.pth.tar``: ``{"state_dict": ...}``, ConvBN's ``conv``/``bn``
  names, an ImageNet ``head`` that is ignored), or a ``visual.``-prefixed CLIP image tower;

- OpenAI CLIP / open_clip: a full CLIP state dict (``token_embedding``, ``positional_embedding``,
  ``transformer.resblocks.N...``, ``ln_final``, ``text_projection``, ``visual.*``), also under a ``text.``
  prefix (open_clip's CustomTextCLIP) or inside ``{"state_dict": ...}``; OpenAI's own release files
  (``ViT-B-32.pt``, TorchScript archives: their tensors are read with ``torch.jit.load``); open_clip's
  hub releases (a folder with ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``; when
  its ``open_clip_config.json`` is there too, its ``quick_gelu`` must agree with the tower's activation);
- Hugging Face BERT: ``pytorch_model.bin`` or ``model.safetensors`` (``bert.`` prefix, old
  ``LayerNorm.gamma/beta`` names, the MLM head ``cls.*`` ignored).

``.safetensors`` files are read here (``read_safetensors``: the format is a JSON header and raw
little-endian tensors), without the safetensors package. Keys of other parts (the image tower, heads)
are counted as ignored, not unexpected. The text projection comes back separately, in nn.Linear's
layout, for the CLIP head. Nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import struct
import warnings
import zipfile
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


# What a folder may hold, in the order looked for: open_clip's hub names first (a LAION hub folder also
# has a model.safetensors, in transformers' CLIPModel layout, which is not this one), then Hugging Face's.
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors", "pytorch_model.bin")
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def weights_file(path: str | Path) -> Path:
    """PATH itself, or the first of WEIGHT_FILES in the folder PATH."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    raise CheckpointError(f"{path}: no {', '.join(WEIGHT_FILES[:-1])} or {WEIGHT_FILES[-1]} in it")


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file: 8 bytes of header length (little-endian), a JSON header
    {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": ...}, then the data."""
    data = memoryview(Path(path).read_bytes())
    try:
        (length,) = struct.unpack("<Q", data[:8])
        if len(data) < 8 + length:
            raise ValueError(f"a header of {length} bytes in a file of {len(data)}")
        header = json.loads(bytes(data[8: 8 + length]))
        entries = {name: (info["dtype"], [int(n) for n in info["shape"]], [int(n) for n in info["data_offsets"]])
                   for name, info in header.items() if name != "__metadata__"}
    except (struct.error, ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    body = data[8 + length:]
    state = {}
    for name, (dtype_name, shape, (begin, end)) in entries.items():
        dtype = _SAFETENSORS_DTYPES.get(dtype_name)
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has dtype {dtype_name!r}; mgpu reads "
                                  f"{', '.join(_SAFETENSORS_DTYPES)}")
        count = 1
        for size in shape:
            count *= size
        if not 0 <= begin <= end <= len(body) or end - begin != count * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {name}: data_offsets {[begin, end]} do not hold shape "
                                  f"{shape} of {dtype_name} in {len(body)} bytes of data")
        # a copy of its own bytes: aligned, writable, and the file's buffer is not kept alive
        tensor = torch.frombuffer(bytearray(body[begin:end]), dtype=dtype) if count else torch.empty(0, dtype=dtype)
        state[name] = tensor.reshape(shape)
    return state


def _is_torchscript(path: Path) -> bool:
    """OpenAI's CLIP release files are TorchScript archives: a zip with the module's code/ in it."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.split("/", 1)[-1].startswith("code/") for name in z.namelist())


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = weights_file(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.is_file() and _is_torchscript(path):
        if not hasattr(torch.jit, "load"):
            raise CheckpointError(f"{path}: a TorchScript archive, which this torch can no longer read: "
                                  "save its state_dict() with a torch that can, and pass that file")
        log.info("%s: a TorchScript archive (as OpenAI releases CLIP); reading its tensors with torch.jit.load", path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 marks torch.jit.load deprecated
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    state = read_checkpoint(path)
    return state.get("state_dict", state) if isinstance(state.get("state_dict"), dict) else state


def _check_activation(tower: ClipTextTower, path: Path) -> None:
    """open_clip's hub folders say in open_clip_config.json whether the model uses QuickGELU."""
    config_file = path.parent / "open_clip_config.json"
    if not config_file.is_file():
        return
    try:
        model_cfg = json.loads(config_file.read_text(encoding="utf-8")).get("model_cfg", {})
    except (ValueError, AttributeError) as exc:
        raise CheckpointError(f"{config_file}: not readable JSON with a model_cfg ({exc})") from None
    wanted = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    if wanted != tower.spec.activation:
        names = {"quick_gelu": "QuickGELU (a clip: name without -gelu, e.g. clip:ViT-B/32)",
                 "gelu": "GELU (a clip: name ending in -gelu, e.g. clip:ViT-B/32-gelu)"}
        raise CheckpointError(f"{path}: {config_file.name} says quick_gelu={model_cfg.get('quick_gelu', False)}, "
                              f"but this text encoder uses {names[tower.spec.activation].split(' (')[0]}; "
                              f"choose one with {names[wanted]}")


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
        _check_activation(tower, weights_file(path))
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
