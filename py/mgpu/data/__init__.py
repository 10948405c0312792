"""Data for the CLIP trainer and inference: ``config`` (DataConfig, --workers auto), ``images`` (reading one
image), ``captions`` (CSV/TSV/JSONL), ``shards`` and ``stream`` (webdataset-style tar shards), ``synthetic``
(the built-in set), ``checks`` (what is checked before training) and ``loading`` (building sets and loaders).
docs/data.md describes the behaviour."""
