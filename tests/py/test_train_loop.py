"""The loop and its command line: no host sync between check steps (counted), --help shows every default,
locked towers stay as loaded, --compile keeps checkpoint keys plain, warnings once per job."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re

import pytest
import torch

from mgpu import train_clip
from mgpu.checkpoint import read_checkpoint, unwrap
from mgpu.train_params import OUTPUT_ROOT, _Help, build_parser, parse_args

from test_train_clip import ROOT, TINY, free_port, run, term_group_at_step, weights


def bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_loop_issues_no_host_sync_between_check_steps(tmp_path):
    counter = bench("train_syncs").SyncCounter()
    with counter:
        assert train_clip.main([*TINY, "--max-steps", "12", "--accum-steps", "2", "--log-every", "8",
                                "--check-every", "5", "--output-dir", str(tmp_path)]) == 0
    assert counter.checks == {5, 8, 10, 12}  # --check-every, the progress lines, the last step
    assert counter.between_checks() == {}
    assert all(counter.per_step[s] >= 1 for s in counter.checks)  # the counter does see the checks' reads


def test_help_shows_every_flags_default_once_and_truthfully():
    parser = build_parser()
    helper = _Help("prog")
    for action in parser._actions:
        if action.option_strings and action.default is not argparse.SUPPRESS:
            text = helper._expand_help(action)
            assert text.count("default:") == 1, (action.option_strings, text)
    text = parser.format_help()
    assert "(default: True)" not in text and "(default: False)" not in text
    no_tb = helper._expand_help(next(a for a in parser._actions if "--no-tb" in a.option_strings))
    assert no_tb == "no TensorBoard events (default: written to <output-dir>/tb)"
    output = helper._expand_help(next(a for a in parser._actions if "--output-dir" in a.option_strings))
    assert output.count("default:") == 1 and str(OUTPUT_ROOT) in output
    workers = helper._expand_help(next(a for a in parser._actions if "--workers" in a.option_strings))
    assert "default: auto, CPU cores / local processes, at most 8" in workers
    assert parse_args([]).workers is None


def test_the_default_output_folder_is_the_launchers():
    assert parse_args(["--text-encoder", "bert:tiny-chinese"]).output_dir == \
        "checkpoints/clip_models/starnet_s1_bert_tiny-chinese"  # run_train_clip.sh: CKPT_DIR/<safe name>


def test_an_unlocked_count_needs_its_lock(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--lock-text-unlocked", "1"])
    assert "--lock-text-unlocked: 1 needs --lock-text" in capsys.readouterr().err


def test_locked_towers_keep_their_weights_and_statistics_but_the_last_blocks_and_projections_train(tmp_path, capsys):
    out = tmp_path / "o"
    assert train_clip.main([*TINY, "--max-steps", "3", "--lock-image", "--lock-text", "--lock-text-unlocked", "1",
                            "--output-dir", str(out)]) == 0
    logged = capsys.readouterr().out
    assert re.search(r"--lock-image: 0 of the image tower's [\d,]+ parameters train; its BatchNorm statistics stay", logged)
    assert re.search(r"--lock-text: [\d,]+ of the text tower's [\d,]+ parameters train \(its last 1 blocks\)", logged)
    torch.manual_seed(0)  # the trainer's initial weights (--seed 0)
    from mgpu.clip import CLIP
    from mgpu.models import image_encoder, text_encoder

    start = CLIP(image_encoder("starnet_s050"), text_encoder("clip:tiny"), 32).state_dict()
    end = weights(out / "checkpoint_3.pt")
    same = {k for k in start if torch.equal(start[k], end[k])}
    assert {k for k in start if k.startswith("visual.")} <= same  # BatchNorm running statistics included
    last = max(int(k.split(".")[3]) for k in start if k.startswith("text.transformer.resblocks."))
    for k in start:
        trains = k.startswith((f"text.transformer.resblocks.{last}.", "text.ln_final.", "image_projection",
                               "text_projection", "logit_scale"))
        assert (k not in same) == trains, k


def test_compile_wraps_the_model_and_checkpoint_keys_stay_plain(tmp_path):
    from mgpu.checkpoint import save_checkpoint
    from mgpu.train_setup import _wrap, build_model

    args = parse_args([*TINY, "--compile"])
    model = build_model(args)
    wrapped = _wrap(model, args, torch.device("cpu"), world=1, dp_gpus=0)
    assert wrapped is not model and unwrap(wrapped) is model
    path = save_checkpoint(tmp_path / "checkpoint_1.pt", wrapped, step=1, epoch=0)
    assert set(read_checkpoint(path)["model"]) == set(model.state_dict())  # no _orig_mod. / module.


def test_grad_checkpointing_says_which_towers_got_it(tmp_path, capsys):
    assert train_clip.main([*TINY, "--max-steps", "2", "--grad-checkpointing", "--output-dir", str(tmp_path)]) == 0
    logged = capsys.readouterr().out
    assert "--grad-checkpointing: on in the image" in logged
    from mgpu.models import text_encoder

    tower = text_encoder("clip:tiny")
    if hasattr(tower, "set_grad_checkpointing"):
        assert "--grad-checkpointing: on in the image and text towers" in logged
    else:
        assert "(text: clip:tiny does not offer it)" in logged


def test_two_ranks_warn_once_per_job_and_keep_a_random_state_each(tmp_path):
    res = run("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
              "-m", "mgpu.train_clip", *TINY, "--max-steps", "2", "--sync-bn", "--output-dir", str(tmp_path / "o"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("[WARNING] --sync-bn: SyncBatchNorm needs CUDA") == 1
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert len(read_checkpoint(tmp_path / "o" / "checkpoint_2.pt")["rng_ranks"]) == 2  # one random state a rank


def test_sigterm_to_every_rank_stops_both_at_one_step_with_one_checkpoint(tmp_path):
    """As Slurm or the launcher stops a DDP job: TERM to the whole process group. Every rank got it; the
    job stops once, at a check step, saying signal 15."""
    code, out = term_group_at_step(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                                    str(free_port()), "-m", "mgpu.train_clip", *TINY, "--max-steps", "100000",
                                    "--log-every", "1", "--output-dir", str(tmp_path / "o")])
    assert code != 0, out
    assert out.count("stopped by signal 15 at step") == 1, out
    saved = list((tmp_path / "o").glob("checkpoint_*.pt"))
    assert len(saved) == 1 and read_checkpoint(saved[0])["step"] >= 2


def test_locking_counts_blocks_per_tower_and_refuses_more_than_there_are():
    from mgpu.clip import CLIP, LockError
    from mgpu.models import image_encoder, text_encoder

    model = CLIP(image_encoder("starnet_s050"), text_encoder("bert:tiny-chinese"), 16)
    trainable, total = model.lock_text_tower(unlocked=1)
    names = {n for n, p in model.text.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("encoder.layer.1.", "pooler.")) for n in names)
    assert trainable == sum(p.numel() for p in model.text.parameters() if p.requires_grad) < total
    trainable, total = model.lock_image_tower()
    assert trainable == 0 and all(p.requires_grad for p in model.image_projection.parameters())
    with pytest.raises(LockError, match="11 blocks to leave unlocked, but StarNet has 10"):
        model.lock_image_tower(unlocked=11)  # s050: 4 stages of 1, 1, 3, 1 blocks, each after a down-sampling
