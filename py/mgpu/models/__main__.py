"""python -m mgpu.models [--json]: every encoder with its parameter count (backbone: no head, no
projection). Models are built on the meta device: no memory is allocated and nothing is downloaded."""

from __future__ import annotations

import argparse
import json

import torch

from . import IMAGE_ENCODERS, TEXT_ENCODERS, count_parameters


def rows() -> list[dict]:
    out = []
    with torch.device("meta"):
        for kind, table in (("image", IMAGE_ENCODERS), ("text", TEXT_ENCODERS)):
            for name, build in table.items():
                model = build()
                out.append({"kind": kind, "name": name, "parameters": count_parameters(model),
                            "out_dim": model.out_dim})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mgpu.models", description=__doc__)
    p.add_argument("--json", action="store_true", help="one JSON list instead of the table")
    args = p.parse_args(argv)
    table = rows()
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    print(f"{'kind':<6}{'encoder':<20}{'parameters':>12}{'out dim':>9}")
    for r in table:
        print(f"{r['kind']:<6}{r['name']:<20}{r['parameters'] / 1e6:>11.2f}M{r['out_dim']:>9}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
