"""bench/gpu_check.py --tiny end to end, where importing Ray, DeepSpeed, MLflow, pyarrow, OpenCV or
pandas fails, as on the GPU machine that has only torch, transformers and safetensors.

Each of those names is shadowed by a stub package (first on PYTHONPATH) whose import raises
ImportError, so an accidental import anywhere in the check's import chain fails the run. Speeds
are not checked (meaningless on a shared CPU); every section must succeed with finite, positive
numbers."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from conftest import REPO_ROOT

BLOCKED = ("ray", "deepspeed", "mlflow", "pyarrow", "cv2", "pandas")
SECTIONS = ("vision", "train", "generate", "dtypes")
POSITIVE = {  # per section: dotted keys that must be finite and > 0
    "vision": ["device_efficient_clips_per_s", "device_literal_clips_per_s", "cpu_efficient_clips_per_s",
               "device_over_cpu_speedup", "efficient_over_literal_speedup", "visual_tokens"],
    "train": ["online.samples_per_s", "online.tokens_per_s", "online.mfu", "online.mfu_lm",
              "online.model_tflop_per_step", "online.peak_memory_gib", "cached_features.samples_per_s",
              "cached_features.mfu", "seq_len", "model.params_trained"],
    "generate": ["tokens_per_s.batched_cached", "tokens_per_s.batch1_cached", "tokens_per_s.batch1_uncached",
                 "batched_over_batch1_cached", "batched_over_batch1_uncached", "generated_tokens.batched_cached",
                 "peak_memory_gib"],
    "dtypes": ["bf16_step_s", "export_save_s", "eval_load_s", "export_gib", "lm_layers"],
}


def _get(node, dotted: str):
    for key in dotted.split("."):
        node = node[key]
    return node


def _numbers(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _numbers(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _numbers(value)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield tree


def test_tiny_gpu_check_without_ray_deepspeed_mlflow_pyarrow(tmp_path):
    stubs = tmp_path / "stubs"
    for name in BLOCKED:
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text(
            f"raise ImportError('{name} is not installed on the GPU machine (stub from tests/test_gpu_check.py)')\n")
    out = tmp_path / "gpu_check.json"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(stubs), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--tiny", "--out", str(out)], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "GPU check (tiny)" in proc.stdout and "wrote" in proc.stdout  # the human summary

    report = json.loads(out.read_text())
    assert report["mode"] == "tiny" and report["forbidden_modules_imported"] == []
    assert report["device_info"]["torch"] and report["device_info"]["device"] == "cpu"
    for name in SECTIONS:
        section = report["sections"][name]
        assert section["status"] == "ok", (name, section.get("error"), section.get("traceback"))
        for key in POSITIVE[name]:
            value = _get(section, key)
            assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (name, key, value)
    assert all(math.isfinite(x) for x in _numbers(report["sections"])), "a non-finite number in a section"
    assert report["sections"]["train"]["online"]["losses_finite"]
    assert report["sections"]["train"]["model"]["gradient_checkpointing"]
    assert all(v is not None for v in report["headline"].values()), report["headline"]
    # the dtype story: the tower kept its configured dtype outside the bf16 module, the step's loss is finite,
    # training, cache and the bf16 evaluation load compute the same features (and, on the CPU, the same loss)
    dtypes = report["sections"]["dtypes"]
    assert dtypes["vision_dtype"] == dtypes["eval_vision_dtype"] == "torch." + dtypes["configured_vision_dtype"]
    assert dtypes["lm_dtype"] == dtypes["eval_lm_dtype"] == dtypes["decoder_dtype"] == "torch.bfloat16"
    assert not dtypes["tower_in_module_parameters"] and math.isfinite(dtypes["bf16_step_loss"])
    assert dtypes["bf16_step_loss_dtype"] == dtypes["pred_dtype"] == "torch.float32"
    assert dtypes["features_bit_identical_training_vs_cache"] and dtypes["eval_features_bit_identical"]
    assert dtypes["eval_loss_abs_diff"] == 0.0
