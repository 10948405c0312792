"""DataConfig, the one typed config for building data, and --workers auto."""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from pathlib import Path

import pytest
import torch

from mgpu import infer
from mgpu.data import config as config_module
from mgpu.data import loading
from mgpu.data.config import DataConfig, auto_workers
from mgpu.train_params import parse_args


@pytest.mark.parametrize("cores, local, expected", [(2, None, 2), (64, None, 8), (16, "4", 4), (2, "4", 0),
                                                    (6, "4", 1), (3, "junk", 3), (12, "0", 8)])
def test_auto_workers_are_the_usable_cores_over_the_local_processes_at_most_8(monkeypatch, cores, local, expected):
    monkeypatch.setattr(config_module.os, "sched_getaffinity", lambda pid: set(range(cores)))
    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    assert auto_workers() == expected
    assert DataConfig().loader_workers == expected and DataConfig(workers=3).loader_workers == 3


def test_the_config_defaults_are_the_trainers_flag_defaults():
    args = parse_args([])
    for field in dataclasses.fields(DataConfig):
        if field.name != "workers":  # None (auto) in the trainer once its flag defaults to auto
            assert getattr(args, field.name) == field.default, field.name
    made = DataConfig.from_args(args)
    assert made.data == "synthetic" and DataConfig.from_args(made) is made


def test_from_a_checkpoints_config_unknown_keys_are_ignored_and_overrides_win():
    saved = {"data": "train.csv", "image_size": 64, "lr": 0.1, "workers": 4, "image_encoder": "starnet_s1"}
    made = DataConfig.from_mapping(saved, workers=None)
    assert (made.data, made.image_size, made.workers, made.val_fraction) == ("train.csv", 64, None, 0.05)


def test_infer_no_longer_imitates_the_trainers_namespace():
    source = Path(infer.__file__).read_text()
    assert "train_params" not in source and "Namespace(" not in source


def test_workers_auto_builds_loaders_without_torchs_worker_warning(monkeypatch):
    monkeypatch.setattr(config_module.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    args = argparse.Namespace(**{**vars(parse_args(["--text-encoder", "clip:tiny", "--image-size", "32",
                                                    "--train-size", "16", "--val-size", "4", "--batch-size", "4"])),
                                 "workers": None})
    train, val, _ = loading.build_data(args, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when workers exceed the cores it sees
        train_loader, val_loader, epochs, steps = loading.build_loaders(args, train, val, 4, torch.device("cpu"))
        epochs.set_epoch(0)
        assert train_loader.num_workers == 2 and steps == 4
        assert next(iter(train_loader))["image"].shape == (4, 3, 32, 32)
