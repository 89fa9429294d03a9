"""Sweep grids, sweep files and job-array manifests (megatron_lpreg.launch.manifest)."""
from __future__ import annotations

import json

import pytest

from megatron_lpreg.config import ConfigError
from megatron_lpreg.config.base import parse_override
from megatron_lpreg.launch.manifest import (
    ArrayManifest,
    GridAxis,
    SweepSpec,
    load_sweep_file,
    override_text,
    parse_grid,
    read_status,
    write_status,
)


def test_parse_grid():
    assert parse_grid("algo.rho=0.005,0.01") == GridAxis("algo.rho", ("0.005", "0.01"))
    assert parse_grid(" seed = 1, 2 ") == GridAxis("seed", ("1", "2"))
    assert parse_grid("data.source=a=b").values == ("a=b",)


@pytest.mark.parametrize("text, message", [
    ("algo.rho", "must look like dotted.key=v1,v2"),
    ("=1,2", "empty key"),
    ("algo..rho=1", "empty key"),
    ("algo.rho=", "empty value"),
    ("algo.rho=0.1,,0.2", "empty value"),
    ("algo.rho=0.1,", "empty value"),
    ("seed=1,2,1", r"repeats value\(s\) \['1'\]"),
    ("algo.rho=[1", "cannot parse value"),
])
def test_parse_grid_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_grid(text)


def test_tasks_are_the_product_first_axis_slowest():
    spec = SweepSpec(axes=[parse_grid("algo.rho=0.005,0.01"), parse_grid("seed=1,2,3")])
    assert spec.tasks() == [
        ["algo.rho=0.005", "seed=1"], ["algo.rho=0.005", "seed=2"], ["algo.rho=0.005", "seed=3"],
        ["algo.rho=0.01", "seed=1"], ["algo.rho=0.01", "seed=2"], ["algo.rho=0.01", "seed=3"],
    ]


def test_rows_times_grid():
    spec = SweepSpec(rows=[["algo.name=lpreg"], ["algo.name=grpo", "algo.clip_high=0.2"]],
                     axes=[parse_grid("seed=1,2")])
    assert spec.tasks() == [["algo.name=lpreg", "seed=1"], ["algo.name=lpreg", "seed=2"],
                            ["algo.name=grpo", "algo.clip_high=0.2", "seed=1"],
                            ["algo.name=grpo", "algo.clip_high=0.2", "seed=2"]]


def test_empty_and_clashing_sweeps_are_errors():
    with pytest.raises(ConfigError, match="empty sweep"):
        SweepSpec().tasks()
    with pytest.raises(ConfigError, match="keys repeat"):
        SweepSpec(axes=[parse_grid("seed=1,2"), parse_grid("seed=3")]).tasks()
    with pytest.raises(ConfigError, match=r"\['seed'\] are both swept and given as a common override"):
        SweepSpec(axes=[parse_grid("seed=1,2")], overrides=["seed=4"]).tasks()
    with pytest.raises(ConfigError, match="sets a key twice"):
        SweepSpec(rows=[["seed=1"]], axes=[parse_grid("seed=2,3")]).tasks()


@pytest.mark.parametrize("value", [0.005, 1e-6, 2.5e10, float("inf"), 3, True, None, [1, 2], "qwen_chat", {"a": 1}])
def test_override_text_round_trips_through_the_override_parser(value):
    assert parse_override(override_text("k.x", value)) == ("k.x", value)


def test_sweep_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("description: d\noverrides:\n  trainer.max_steps: 4\n"
                    "rows:\n  - {algo.name: grpo}\n  - {algo.name: lpreg, algo.rho: 0.01}\n"
                    "grid:\n  seed: [1, 2]\n")
    spec = load_sweep_file(path)
    assert spec.overrides == ["trainer.max_steps=4"]
    assert spec.tasks() == [["algo.name=grpo", "seed=1"], ["algo.name=grpo", "seed=2"],
                            ["algo.name=lpreg", "algo.rho=0.01", "seed=1"],
                            ["algo.name=lpreg", "algo.rho=0.01", "seed=2"]]


@pytest.mark.parametrize("text, message", [
    ("grids: {seed: [1]}\n", "a sweep file is a mapping with keys"),
    ("grid: {seed: 1}\n", "'grid' must map dotted keys to non-empty lists"),
    ("grid: {seed: []}\n", "'grid' must map dotted keys to non-empty lists"),
    ("rows: [seed]\n", "'rows' must be a list of non-empty mappings"),
    ("overrides: 3\n", "'overrides' must be a mapping or a list"),
    ("grid: {seed: [1, 1]}\n", "repeats a value"),
])
def test_sweep_file_errors(tmp_path, text, message):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_sweep_file(path)
    with pytest.raises(ConfigError, match="sweep file not found"):
        load_sweep_file(tmp_path / "missing.yaml")


def test_manifest_round_trip_and_task_argv(tmp_path):
    manifest = ArrayManifest(kind="train", command=["py", "-m", "megatron_lpreg", "train", "/c.yaml", "x=1"],
                             tasks=[["algo.rho=0.005", "data.source=my file.jsonl"], ["algo.rho=0.01"]],
                             task_args=["trainer.output_dir={task_dir}"], meta={"grid_keys": ["algo.rho"]})
    manifest.write(tmp_path)
    assert (tmp_path / "manifest.txt").read_text() == (
        "algo.rho=0.005 'data.source=my file.jsonl'\nalgo.rho=0.01\n")
    assert {"logs", "status"} <= {p.name for p in tmp_path.iterdir()}
    back = ArrayManifest.read(tmp_path)
    assert back == manifest
    assert back.task_argv(tmp_path, 0) == ["py", "-m", "megatron_lpreg", "train", "/c.yaml", "x=1", "algo.rho=0.005",
                                           "data.source=my file.jsonl", f"trainer.output_dir={tmp_path}/task_0"]
    with pytest.raises(ValueError, match="array task 2 does not exist.*tasks 0..1"):
        back.task_argv(tmp_path, 2)
    assert "tasks" not in json.loads((tmp_path / "array.json").read_text())  # manifest.txt is the one source
    with pytest.raises(ValueError, match="not a job-array directory"):
        ArrayManifest.read(tmp_path / "task_0")


def test_status_files(tmp_path):
    assert read_status(tmp_path, 0) is None
    write_status(tmp_path, 0, {"exit_code": 3})
    assert read_status(tmp_path, 0) == {"exit_code": 3}
    (tmp_path / "status" / "task_1.json").write_text("{torn")
    assert read_status(tmp_path, 1) is None
