"""mgpu.grid: the configurations of a sweep, hyper-parameter grids and random search."""

import json

import pytest

from mgpu import grid, grid_space


def write(tmp_path, doc, name="sweep.json"):
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)


def test_values_as_flag_text_and_name_labels():
    assert [grid_space.fmt(v) for v in (0.0003, 1e-5, 0.001, 0.05, 64, 2.0, True, 1.5e7, 1.5e-7, -0.0002)] == \
        ["3e-4", "1e-5", "1e-3", "0.05", "64", "2", "true", "15000000", "1.5e-7", "-2e-4"]
    assert grid_space.label("batch_size", 64) == "bs64"
    assert grid_space.label("fp16", True) == "fp16" and grid_space.label("fp16", False) == "nofp16"
    assert grid_space.label("some_key", 3) == "somekey3"


def test_long_names_keep_their_start_and_end_with_a_stable_hash():
    long = "x" * 300
    name = grid_space.safe_name(long)
    assert len(name) == 120 and name.startswith("x" * 111 + "_") and name == grid_space.safe_name(long)
    assert grid_space.safe_name(long + "1") != grid_space.safe_name(long + "2")
    assert grid_space.safe_name("../it's $(x)") == "_._it_s___x_"


def test_a_grid_is_the_cross_product_named_by_the_keys_that_vary(tmp_path):
    path = write(tmp_path, {"image_encoders": ["s1", "s2"], "text_encoders": ["t"],
                            "args": {"lr": [1e-3, 3e-4], "epochs": 2, "fp16": True}})
    configs = grid.from_file(path)
    assert [c.name for c in configs] == ["s1_t_lr1e-3", "s1_t_lr3e-4", "s2_t_lr1e-3", "s2_t_lr3e-4"]
    assert configs[1].flags() == ["--lr", "0.0003", "--epochs", "2", "--fp16"]
    assert configs[1].params() == {"lr": 0.0003}
    assert configs[1].paths["lr"] == ".args.lr"


def test_a_file_saved_with_a_bom_and_windows_line_ends_reads_as_without(tmp_path):
    doc = {"image_encoders": ["s1"], "text_encoders": ["t1", "t2"]}
    plain = write(tmp_path, doc)
    windows = tmp_path / "windows.json"
    windows.write_bytes(b"\xef\xbb\xbf" + json.dumps(doc, indent=2).replace("\n", "\r\n").encode())
    assert [c.name for c in grid.from_file(str(windows))] == [c.name for c in grid.from_file(plain)] == ["s1_t1", "s1_t2"]


def test_a_list_of_configurations_with_defaults_and_launcher_keys(tmp_path):
    path = write(tmp_path, {"defaults": {"epochs": 3, "gpus_per_job": 2},
                            "configs": [{"name": "small", "image_encoder": "a", "text_encoder": "b", "lr": 0.1},
                                        {"image_encoder": "c", "text_encoder": "d", "gpus_per_job": 1,
                                         "need_mem": "12G", "seed": [0, 1]}]})
    configs = grid.from_file(path)
    assert [c.name for c in configs] == ["small", "c_d_seed0", "c_d_seed1"]
    assert configs[0].flags() == ["--epochs", "3", "--lr", "0.1"]
    assert configs[0].launcher() == "gpus_per_job=2"
    assert configs[2].launcher() == "gpus_per_job=1 need_mem=12G"
    assert "--gpus-per-job" not in configs[2].flags()


@pytest.mark.parametrize("doc, message", [
    ("", ".: the file is empty: it must hold one JSON object"),
    ('{"configs": []} {"configs": []}', ".: the file holds 2 JSON documents one after another; it must hold one"),
    ('{"configs": [', "not valid JSON: Expecting value at line 1, column 14"),
    ('{"a": NaN}', "not valid JSON: NaN is not a JSON number"),
    ("[]", ".: must be a JSON object: a grid"),
    ('{"x": 1}', '.: has neither "configs" (a list) nor "image_encoders"/"text_encoders" (a grid)'),
    ('{"image_encoders": ["a"], "text_encoders": ["b"], "args": {"output_dir": "/tmp"}}',
     ".args.output_dir: is reserved: the launcher sets each configuration's output folder"),
    ('{"defaults": {"output-dir": "x"}, "configs": [{"image_encoder": "a", "text_encoder": "b"}]}',
     ".defaults.output-dir: is reserved"),
    ('{"defaults": {"image_encoder": "x"}, "configs": [{"image_encoder": "a", "text_encoder": "b"}]}',
     ".defaults.image_encoder: is reserved"),
    ('{"image_encoders": ["a"], "text_encoders": ["b"], "args": {"text_encoder": "x"}}', ".args.text_encoder: is reserved"),
    ('{"configs": [{"image_encoder": "a", "text_encoder": "b", "lr": []}]}', ".configs[0].lr: is an empty list"),
    ('{"configs": [{"image_encoder": "a", "text_encoder": "b", "lr": [1, [2]]}]}', ".configs[0].lr[1]: must be a string"),
    ('{"configs": [{"image_encoder": "a", "text_encoder": "b", "lr": {"log_uniform": [0, 1]}}]}',
     ".configs[0].lr.log_uniform: needs low < high, both above 0"),
    ('{"configs": [{"image_encoder": "a", "text_encoder": "b", "n": {"int_uniform": [1, 2.5]}}]}',
     ".configs[0].n.int_uniform: needs low < high, both integers"),
    ('{"configs": [{"image_encoder": "a", "text_encoder": "b", "note": "a\\nb"}]}', ".configs[0].note: must not contain a newline"),
    ('{"configs": [{"image_encoder": "", "text_encoder": "b"}]}', ".configs[0].image_encoder: must be a non-empty string"),
    ('{"configs": [{"text_encoder": "b"}]}', '.configs[0]: missing key "image_encoder"'),
    ('{"configs": [{"image_encoder": "a", "text_encoder": "b", "lr": 0.1, "lr": 0.001}]}',
     ".configs[0]: names the key 'lr' twice; JSON keeps only the last value: write it once"),
    ('{"image_encoders": ["a"], "image_encoders": ["b"], "text_encoders": ["c"]}',
     ".: names the key 'image_encoders' twice; JSON keeps only the last value: write it once"),
    ('{"defaults": {"epochs": 1, "x": {"y": 1, "y": 2}}, "configs": []}',
     ".defaults.x: names the key 'y' twice; JSON keeps only the last value: write it once"),
    ('{"configs": [{"name": "x", "image_encoder": "a", "text_encoder": "b"}, {"name": "x", "image_encoder": "c", "text_encoder": "d"}]}',
     "two configurations are both named 'x' (.configs[0] and .configs[1]): give them different names"),
])
def test_faults_name_the_json_path(tmp_path, doc, message):
    with pytest.raises(grid.GridError) as caught:
        grid.from_file(write(tmp_path, doc))
    assert message in str(caught.value)


def test_random_search_is_reproducible_and_stays_in_its_ranges(tmp_path):
    path = write(tmp_path, {"image_encoders": ["a"], "text_encoders": ["t"],
                            "args": {"lr": {"log_uniform": [1e-5, 1e-3]}, "wd": {"uniform": [0.0, 0.5]},
                                     "layers": {"int_uniform": [2, 4]}, "bs": [32, 64]}})
    first = grid.from_file(path, sample=200, seed=5)
    assert [c.options for c in first] == [c.options for c in grid.from_file(path, sample=200, seed=5)]
    assert [c.options for c in first] != [c.options for c in grid.from_file(path, sample=200, seed=6)]
    lrs = [c.options["lr"] for c in first]
    assert all(1e-5 <= x <= 1e-3 for x in lrs)
    # log-uniform: about half the draws below the geometric middle (1e-4)
    assert 70 < sum(x < 1e-4 for x in lrs) < 130
    assert {c.options["layers"] for c in first} == {2, 3, 4}
    assert all(0.0 <= c.options["wd"] <= 0.5 for c in first)
    assert {c.options["bs"] for c in first} == {32, 64}
    assert all(float(f"{x:.3g}") == x for x in lrs)  # three significant digits: flag, name and record agree
    assert len({c.name for c in first}) == 200 or pytest.fail("names must be unique")


def test_sampling_a_plain_grid_picks_distinct_points(tmp_path):
    path = write(tmp_path, {"image_encoders": ["a"], "text_encoders": ["t"], "args": {"lr": [1, 2, 3, 4], "bs": [8, 16]}})
    picked = grid.from_file(path, sample=3, seed=1)
    assert len({c.name for c in picked}) == 3
    assert {c.name for c in picked} <= {c.name for c in grid.from_file(path)}
    assert len(grid.from_file(path, sample=100, seed=1)) == 8  # no more than the grid has


def test_ranges_need_a_sample(tmp_path):
    path = write(tmp_path, {"image_encoders": ["a"], "text_encoders": ["t"], "args": {"lr": {"uniform": [0, 1]}}})
    with pytest.raises(grid.GridError, match=r"^\.args\.lr: is a range: give --sample N"):
        grid.from_file(path)


def test_the_trainer_checks_every_configuration_naming_the_json_path(tmp_path):
    path = write(tmp_path, {"image_encoders": ["starnet_s050"], "text_encoders": ["clip:tiny"],
                            "args": {"lr": [1e-3, 3e-4], "batch_sise": 64}})
    with pytest.raises(grid.GridError) as caught:
        grid.check_trainer(grid.from_file(path), [])
    assert str(caught.value) == ("starnet_s050_clip_tiny_lr1e-3 (.args.batch_sise): the trainer refuses it: "
                                 "unrecognized arguments: --batch-sise 64 (did you mean --batch-size?)")
    good = grid.from_file(write(tmp_path, {"image_encoders": ["starnet_s050"], "text_encoders": ["clip:tiny"],
                                           "args": {"lr": [1e-3, 3e-4]}}, "good.json"))
    grid.check_trainer(good, ["--max-steps", "3"])
    with pytest.raises(grid.GridError, match=r"\(trainer arguments after --\): the trainer refuses it: .*--lr"):
        grid.check_trainer(good, ["--lr", "fast"])


def test_the_cli_prints_the_lines_the_launcher_reads(tmp_path, capsys):
    path = write(tmp_path, {"image_encoders": ["a"], "text_encoders": ["t"], "args": {"lr": [0.1, 0.2], "need_mem": "8G"}})
    assert grid.main(["--config-file", path]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:10] == ["a_t_lr0.1", "a", "t", ".image_encoders x .text_encoders", '{"lr":0.1}', "need_mem=8G",
                          "2", "--lr", "0.1", "."]
    assert grid.main(["--config-file", path, "--sample", "0"]) == 2
    assert "--sample: must be an integer of at least 1, got 0" in capsys.readouterr().err
    assert grid.main(["--image-encoders", "a,b", "--text-encoders", "t"]) == 0
    assert capsys.readouterr().out.splitlines()[0::8] == ["a_t", "b_t"]
