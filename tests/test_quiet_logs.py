"""Quiet, informative runs (the operator's view).

A short real training (its own local Ray, in a subprocess, 2 workers) prints every progress line
exactly once, no other line more than twice (two workers may each say the same thing once), and
nothing at error level. A preprocessing run that writes no sample says why in one warning line,
and ``--strict`` turns that into exit status 1.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections import Counter

import pytest
from conftest import ERROR_WORD, MAX_REPEATS, PROGRESS_LINE, RAY_CPP_ERROR, REPO_ROOT, isolated_env, message

from pipelines import preprocess, train
from preprocessing import layout
from synthkitchens.generate import generate, preprocess_source_args, tree_paths

pytestmark = pytest.mark.ray

TRAIN_STEPS = 4
TRAIN_TIMEOUT_S = 300  # a safety net: the run takes 1.5-2 minutes on 2 busy CPUs
def test_a_short_training_prints_each_line_once_and_no_error(synth_data, tmp_path):
    run_name = f"quiet-{uuid.uuid4().hex[:8]}"
    storage = tmp_path / "ray_results"
    # RAY_DEDUP_LOGS=0: count every copy, instead of Ray's "[repeated Nx across cluster]" summaries
    env = isolated_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", RAY_DEDUP_LOGS="0")
    done = subprocess.run(
        [sys.executable, "pipelines/train.py", "--config", "tiny", "--data", str(synth_data / layout.SAMPLES_DIR),
         "--run-name", run_name, "--storage", str(storage), "--max-steps", str(TRAIN_STEPS),
         "--set", f"train.export_dir={tmp_path / 'models'}", "--set", "train.micro_batch_size=2",
         "--set", "train.log_every=1"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=TRAIN_TIMEOUT_S)
    output = done.stdout
    assert done.returncode == 0, output[-6000:]  # --data OUT/samples is accepted as OUT

    lines = [message(line) for line in output.splitlines() if line.strip()]
    progress = Counter(line for line in lines if PROGRESS_LINE.match(line))
    assert sorted(int(line.split()[2].split("/")[0]) for line in progress) == list(range(1, TRAIN_STEPS + 1))
    assert set(progress.values()) == {1}, progress
    repeated = {line: n for line, n in Counter(lines).items() if n > MAX_REPEATS}
    assert not repeated, repeated
    errors = [line for line in output.splitlines() if RAY_CPP_ERROR.search(line) or ERROR_WORD.search(line)]
    assert not errors, errors
    assert "Traceback" not in output, output[-6000:]
    # what a re-run of this name finds (and reports as finished, see train.launch)
    assert train.previous_run_step(str(storage), run_name) == TRAIN_STEPS


def test_preprocess_says_why_no_sample_was_written_and_strict_fails(tmp_path, ray_local, capsys):
    tree, out = tmp_path / "synth", tmp_path / "data"
    generate(str(tree), videos=2, actions_per_video=2, seed=0, workers=1, write_videos=False)
    tree_paths(tree)["epic_root"].mkdir(exist_ok=True)  # no media needed: nothing labelled gets decoded
    # the SynthKitchens tree without --questions/--labels: every action is unlabelled
    args = [arg for flag, value in zip(*[iter(preprocess_source_args(tree))] * 2)
            if flag in ("--epic-root", "--annotations") for arg in (flag, value)]
    assert preprocess.main([*args, "--out", str(out), "--no-progress"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    assert len(warnings) == 1, warnings
    assert "samples wrote 0 samples for train, validation" in warnings[0]
    assert "--labels" in warnings[0] and "--unlabelled keep" in warnings[0]

    assert preprocess.main([*args, "--out", str(out), "--no-progress", "--strict"]) == preprocess.EXIT_EMPTY_OUTPUT
    assert "error: samples wrote 0 samples" in capsys.readouterr().err
