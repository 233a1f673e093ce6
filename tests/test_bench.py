"""bench/run.py end to end on the smallest inputs: every result key is present and finite.

Speeds are not checked (they are meaningless at this size and on a shared machine); this only
keeps the benchmark code from rotting as the components it calls change."""

from __future__ import annotations

import json
import math
import sys

import pytest
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))  # bench/ is a directory of scripts, not an installed package

from bench import run as bench_run
from bench.targets import TARGETS

pytestmark = pytest.mark.ray

SECTIONS = ("machine", "preprocess", "vision", "generate", "train", "scaling", "summary", "targets", "profiles")


@pytest.fixture(scope="module")
def results(tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("bench")
    bench_run.main(["--tiny-test", "--out", str(out / "results.json"), "--markdown", str(out / "RESULTS.md"),
                    "--workdir", str(out / "work")])
    return out


def test_every_key_is_present_and_finite(results):
    data = json.loads((results / "results.json").read_text())
    assert set(SECTIONS) <= set(data)
    assert data["mode"] == "tiny-test" and data["all_finite"]
    for name in TARGETS:
        value = data["summary"][name]
        assert isinstance(value, bool) or math.isfinite(value), name
        assert data["targets"][name]["value"] == value
    assert data["summary"]["vision_max_abs_diff"] < 1e-4  # the two visual paths agree
    for side in ("ray", "bare"):
        assert data["preprocess"][side]["clips_per_s"] > 0
    for run in ("plain_online", "ray_online", "plain_cached", "ray_cached"):
        assert data["train"][run]["windows_samples_per_s"], run
    assert data["scaling"]["vicuna-7b"]["release"]["gpu_hours"] > data["scaling"]["vicuna-7b"]["efficient"]["gpu_hours"]


def test_markdown_report_names_the_machine_and_every_target(results):
    text = (results / "RESULTS.md").read_text()
    assert "torch" in text and "ray" in text and "deepspeed" in text and "CPUs" in text
    for name in TARGETS:
        assert f"`{name}`" in text
    for name, status in json.loads((results / "results.json").read_text())["targets"].items():
        if status["met"] is False:
            assert f"### `{name}`" in text  # every miss is explained
