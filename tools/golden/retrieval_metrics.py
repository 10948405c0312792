"""Golden retrieval metrics: open_clip_train's ``get_clip_metrics`` (R@1/5/10, mean and median rank,
both directions) on random features and on tie-heavy cases.

Run (see tools/golden/README.md for the reference environment):
    /tmp/golden-venv/bin/python tools/golden/retrieval_metrics.py [--compare]
Writes tests/fixtures/golden/retrieval_metrics.json.gz: {"reference": versions, "cases": [{"name",
"image", "text", "divisor", "logit_scale", "metrics"}, ...]}: the features are the integer matrices
image and text divided by divisor (small integers and multiples of 1/8, exact in float32, so the
logits mgpu computes are the reference's bit for bit).
The cases: 300 random feature sets of 1 to 40 samples (odd and even N, where a median takes the mean
of the two middle values; the coarse values make many ties), duplicated texts and images (exact ties
with the true match), all texts equal, a logit scale of 100, and the example of the issue report.
--compare also runs mgpu.metrics.retrieval_metrics and prints how many values differ.
"""

from __future__ import annotations

import argparse
import gzip
import json

import torch

from _reference import FIXTURES, mgpu_on_path, open_clip_train_function, versions


def case(name: str, image: torch.Tensor, text: torch.Tensor, divisor: int = 1, logit_scale: float = 1.0) -> dict:
    return {"name": name, "image": image.long(), "text": text.long(), "divisor": divisor, "logit_scale": logit_scale}


def features(c: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return c["image"].float() / c["divisor"], c["text"].float() / c["divisor"]


def cases() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(300):
        n, d = int(torch.randint(1, 41, (1,), generator=g)), int(torch.randint(2, 9, (1,), generator=g))
        out.append(case(f"random {i} (N={n}, d={d})", torch.randint(-4, 5, (n, d), generator=g),
                        torch.randint(-4, 5, (n, d), generator=g), divisor=8))
    for n in (6, 9, 20, 31):
        image = torch.randint(-4, 5, (n, 4), generator=g)
        text = image + torch.randint(-1, 2, (n, 4), generator=g)
        dup = torch.randint(0, n, (n,), generator=g)
        out.append(case(f"duplicated texts (N={n})", image, text[dup.sort().values]))
        out.append(case(f"duplicated images (N={n})", image[dup], text))
        out.append(case(f"every text the same (N={n})", image, torch.ones(n, 4)))
        out.append(case(f"scaled by 100 (N={n})", image, text, logit_scale=100.0))
    m = torch.tensor([[16, 15, 14, 13], [11, 12, 10, 9], [8, 7, 5, 6], [4, 3, 2, 1]])
    out.append(case("issue 14 example", torch.eye(4), m.T))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compare", action="store_true", help="also compare mgpu's retrieval_metrics (default: off)")
    args = p.parse_args()
    get_clip_metrics = open_clip_train_function("train", "get_clip_metrics")
    doc = {"reference": versions(), "function": "open_clip_train.train.get_clip_metrics", "cases": []}
    for c in cases():
        metrics = get_clip_metrics(*features(c), c["logit_scale"])
        doc["cases"].append({**c, "image": c["image"].tolist(), "text": c["text"].tolist(),
                             "metrics": {k: float(v) for k, v in metrics.items()}})
    out = FIXTURES / "retrieval_metrics.json.gz"
    with gzip.open(out, "wt", encoding="utf-8", compresslevel=9) as f:
        json.dump(doc, f, separators=(",", ":"))
    print(f"{out}: {len(doc['cases'])} cases, {sum(len(c['metrics']) for c in doc['cases'])} values")
    if args.compare:
        mgpu_on_path()
        from mgpu.metrics import retrieval_metrics
        differ, total, worst = 0, 0, 0.0
        for c in doc["cases"]:
            image, text = features({**c, "image": torch.tensor(c["image"]), "text": torch.tensor(c["text"])})
            ours = retrieval_metrics(image, text, logit_scale=c["logit_scale"])
            for key, value in c["metrics"].items():
                total += 1
                worst = max(worst, abs(ours[key] - value))
                if ours[key] != value:
                    differ += 1
                    print(f"  {c['name']}: {key} mgpu {ours[key]} open_clip {value}")
        print(f"mgpu retrieval_metrics vs open_clip get_clip_metrics: {differ} of {total} values differ, "
              f"max abs diff {worst:g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
