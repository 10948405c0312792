"""Golden .safetensors file: one tensor of each dtype mgpu's reader takes, written by the safetensors
package (with metadata, a 0-d and an empty tensor), and the values as JSON.

Run (see tools/golden/README.md for the reference environment):
    /tmp/golden-venv/bin/python tools/golden/safetensors_dtypes.py
Writes tests/fixtures/golden/safetensors_dtypes.safetensors and safetensors_dtypes.json
({name: {"dtype": torch dtype name, "shape": [...], "values": flat list (bfloat16/float16 as float)}}).
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from _reference import FIXTURES


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, generator=g)
    return {"f64": x.double(), "f32": x, "f16": x.half(), "bf16": x.bfloat16(),
            "i64": torch.arange(-3, 3), "i32": torch.arange(4, dtype=torch.int32).reshape(2, 2),
            "i16": torch.tensor([-2, 7], dtype=torch.int16), "i8": torch.tensor([-128, 127], dtype=torch.int8),
            "u8": torch.tensor([0, 255], dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
            "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}


def main() -> int:
    state = tensors()
    FIXTURES.mkdir(parents=True, exist_ok=True)
    save_file(state, str(FIXTURES / "safetensors_dtypes.safetensors"), metadata={"format": "pt", "by": "safetensors"})
    doc = {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape),
               "values": v.float().flatten().tolist() if v.is_floating_point() else v.flatten().tolist()}
           for k, v in state.items()}
    (FIXTURES / "safetensors_dtypes.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{FIXTURES / 'safetensors_dtypes.safetensors'}: {len(state)} tensors")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
