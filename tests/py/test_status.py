"""mgpu.status: replaying a sweep's event file, a running job's progress, and --compare."""

import json
import os
import socket

import pytest

from mgpu import status


def events(tmp_path, lines, name="sweep_20261129_120000_1.events"):
    path = tmp_path / name
    path.write_text("\n".join("\t".join(map(str, line)) for line in lines) + "\n")
    return path


def test_replay_follows_every_event_and_survives_a_line_cut_short(tmp_path):
    log = tmp_path / "a.log"
    log.write_text("# mgpu: a on GPU 0\nstep 3/10 (30%) loss 0.5 samples/s 9 ETA 7s\r\nstep 4/10 (40%) loss 0.25 samples/s 9 ETA 6s\n")
    path = events(tmp_path, [
        ("sweep", 1_000_000, os.getpid(), socket.gethostname()),
        ("job", "a", "queued", '{"lr":0.1}', "out/a", ""),
        ("job", "b", "queued", "{}", "out/b", ""),
        ("job", "c", "skipped", "{}", "out/c", "done earlier (--resume)"),
        ("start", "a", 0, str(log), 1_001_000),
        ("wait", "b", 1_002_000, "GPU 1 is busy: utilization 95%"),
        ("start", "b", 1),  # cut short by a crash: ignored
        ("frobnicate", "x"),  # from a newer mgpu: ignored
    ])
    sweep = status.replay(path)
    assert [sweep.jobs[n].state for n in sweep.order] == ["running", "waiting", "skipped"]
    assert sweep.jobs["a"].params == {"lr": 0.1} and sweep.jobs["c"].detail == "done earlier (--resume)"
    status.progress(sweep.jobs["a"])
    assert (sweep.jobs["a"].step, sweep.jobs["a"].total, sweep.jobs["a"].loss, sweep.jobs["a"].eta) == (4, 10, "0.25", "6s")
    assert sweep.launcher_alive() is True
    text = status.render_status(sweep)
    assert "running for" in text and f"launcher pid {os.getpid()}" in text
    assert any(line.split()[:3] == ["b", "waiting", "-"] and line.endswith("GPU 1 is busy: utilization 95%")
               for line in text.splitlines())


def test_an_ended_sweep_and_a_gone_launcher(tmp_path):
    done = events(tmp_path, [("sweep", 1000, 1, "h"), ("job", "a", "queued", "{}", "", ""),
                             ("start", "a", "cpu", "x.log", 2000), ("retry", "a", 1, "oom"),
                             ("start", "a", "cpu", "x.log", 3000), ("end", "a", "succeeded", 0, "", "", 4000),
                             ("finish", 9000, 0)])
    sweep = status.replay(done)
    assert sweep.finished == 9.0 and sweep.jobs["a"].retries == 1 and sweep.jobs["a"].seconds == 4.0
    assert "finished after 8s (exit 0)" in status.render_status(sweep)
    gone = events(tmp_path, [("sweep", 1000, 2 ** 22 + 12345, socket.gethostname()), ("job", "a", "queued", "{}", "", "")],
                  "sweep_20261129_130000_2.events")
    assert status.newest_events(str(tmp_path)) == gone
    assert "is gone without a summary" in status.render_status(status.replay(gone))


def test_compare_keeps_each_configs_newest_record_best_first(tmp_path):
    def summary(name, configs):
        (tmp_path / name).write_text(json.dumps({"configs": configs}))
    row = lambda name, value, status="succeeded", params=None: {  # noqa: E731
        "name": name, "status": status, "seconds": 1.5, "params": params or {},
        "metrics": {"key_metric": "image_to_text_R@1", "image_to_text_R@1": value, "val_loss": 2.0, "epochs": 1}}
    summary("summary_20261129_100000.json", [row("a", 0.2, params={"lr": 0.1}), row("b", 0.9)])
    summary("summary_20261129_110000.json", [row("a", 0.5, params={"lr": 0.1}),
                                             {"name": "b", "status": "skipped", "metrics": None}, row("c", None, "failed")])
    rows = status.compare(str(tmp_path))
    assert [(r["config"], r["value"]) for r in rows] == [("b", 0.9), ("a", 0.5), ("c", None)]
    assert rows[1]["metrics"] == {"image_to_text_R@1": 0.5, "val_loss": 2.0}
    lines = status.render_compare(rows).splitlines()
    assert lines[0].split() == ["config", "lr", "status", "seconds", "image_to_text_R@1"]
    assert lines[2].split() == ["a", "0.1", "succeeded", "1.5", "0.5000"]


def test_nothing_to_show_is_a_clear_error(tmp_path, capsys):
    assert status.main([str(tmp_path)]) == 1
    assert "no sweep in" in capsys.readouterr().err
    with pytest.raises(status.StatusError, match="no summary_"):
        status.compare(str(tmp_path))
