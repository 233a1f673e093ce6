"""ZeRO-3 construction (``handsonvlm.training.Zero3Init``): the model is partitioned over the ranks
while it is created, so no rank ever holds it whole, and its initial weights are the whole-model
build's for the same seed.

Two CPU ranks (gloo, ``torch.distributed`` environment variables, no Ray runtime; marked ``ray``
like the other DeepSpeed integration tests) run this file as a script, next to one process that
builds the same models the plain way (``build_training(..., init=None)``, today's ZeRO-2 path):

* **memory**: a LLaMA-shaped HandsOnVLM of 814M parameters (hidden 2048, 16 layers, intermediate
  5504, the tiny tokenizer's 1,125-token vocabulary, the tiny vision tower): 3.03 GiB in fp32, six
  times the ~0.5 GiB RSS of a process that has imported torch, transformers and DeepSpeed. Each
  rank builds it under zero.Init with the bf16 DeepSpeed config (the GPU recipe's: bf16 partitions)
  and wraps it with ``deepspeed.initialize``; its peak RSS (``VmHWM``, reset before each phase) must
  stay under 0.6 x the fp32 size in both phases, while the plain build's exceeds 1.0 x. The wrap
  runs with the LM frozen: ZeRO-3's model states of a trained LM (fp32 master weights and Adam
  moments, 16 bytes per parameter / world) are the same with or without zero.Init and at world 2
  are twice the fp32 model per rank, more than this machine has (docs/CLUSTER.md, "5. Scaling").
  ``MALLOC_MMAP_THRESHOLD_`` is fixed at 1 MiB in every process so that RSS measures live tensors:
  with glibc's dynamic threshold, freed full-size temporaries (one module's weights before they are
  partitioned) stay in the heap; the ranks then peaked at 0.53 x and 0.82 x. On GPUs these tensors are device memory.
* **equality**: a small model with a pretrained LM whose vocabulary is resized (1,000 -> 1,125
  rows), the projector initialised from an ``mm_projector.bin`` and gradient checkpointing: the
  weights gathered after ``deepspeed.initialize`` are bit-identical to the plain build's, and every
  rank's RNG ends where the plain build's does.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
from conftest import init_gloo_from_env, isolated_env, rendezvous_env, run_to_completion

pytestmark = pytest.mark.ray

BIG_LM = {"hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 16, "num_attention_heads": 16,
          "num_key_value_heads": 16}
SMALL_VOCAB = 1000  # the pretrained LM's rows before the resize to the tokenizer's 1,125
MAX_RATIO, PLAIN_MIN_RATIO = 0.6, 1.0  # peak RSS / fp32 model size: ZeRO-3 ranks below, the plain build above
MMAP_THRESHOLD = str(1 << 20)
GIB = 1 << 30


# ---------------------------------------------------------------- in the rank / plain processes
def _peak_rss() -> int:
    """VmHWM: this process's peak resident set since the last :func:`_reset_peak`, in bytes."""
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def _rss() -> int:
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _configs(big: bool, pretrained: str):
    from handsonvlm.config import ModelConfig, TrainConfig, load_preset
    from handsonvlm.tokens import TINY_TOKENIZER_DIR

    preset = load_preset("tiny")
    if big:
        preset["model"]["lm"]["config"].update(BIG_LM)
    else:
        preset["model"]["lm"].update(pretrained=pretrained, config=None, tokenizer=str(TINY_TOKENIZER_DIR),
                                     gradient_checkpointing=True)
        preset["model"]["projector_init"] = str(Path(pretrained) / "mm_projector.bin")
    return TrainConfig.from_dict(preset["train"]), ModelConfig.from_dict(preset["model"])


def _ds_config(world: int, bf16: bool) -> dict:
    """configs/deepspeed/zero3.json filled in as pipelines/train_worker.deepspeed_config does (that module
    imports Ray, whose import would count in the measured memory)."""
    from handsonvlm.config import CONFIG_DIR

    ds = json.loads((CONFIG_DIR / "deepspeed" / "zero3.json").read_text())
    ds.update({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": world,
               "gradient_clipping": 1.0, "bf16": {"enabled": bf16}, "fp16": {"enabled": False}})
    return ds


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _main(role: str, pretrained: str, out: str) -> None:
    import torch

    torch.set_num_threads(1)
    import deepspeed  # in both roles: the same fixed overhead

    from handsonvlm.training import Zero3Init, build_training

    result: dict = {"start": time.time()}
    zero = role == "rank"
    if zero:
        # plain torch.distributed from MASTER_ADDR/PORT, RANK, WORLD_SIZE, as Ray Train sets it up: Zero3Init
        # brings up deepspeed.comm on it
        init_gloo_from_env()
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()

    # memory: the big model, built (and, on the ranks, wrapped) right after the imports
    train, cfg = _configs(True, pretrained)
    result["base"] = _rss()
    _reset_peak()
    parts = build_training(train, cfg, 5, init=Zero3Init(_ds_config(world, True)) if zero else None)
    result["build_peak"], result["build_end"] = _peak_rss(), _rss()
    result["built"] = time.time()
    result["params"] = sum(getattr(p, "ds_numel", p.numel()) for p in parts.model.parameters())
    if zero:
        model = parts.model
        model.lm.requires_grad_(False)  # no optimizer states for the LM: see the module docstring
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        _reset_peak()
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=_ds_config(world, True))
        result["wrap_peak"] = _peak_rss()
        result["wrapped"] = time.time()
        del engine, optimizer, model
    del parts

    # equality: the small model, gathered after deepspeed.initialize on the ranks
    train, cfg = _configs(False, pretrained)
    if zero:
        ds = _ds_config(world, False)
        parts = build_training(train, cfg, 5, init=Zero3Init(ds))
        result["rng"] = torch.get_rng_state().tolist()
        named = dict(parts.model.named_parameters())
        result["whole"] = sorted(n for n, p in named.items() if not hasattr(p, "ds_id"))
        result["tower_partitioned"] = any(hasattr(p, "ds_id") for p in parts.model.vision.parameters())
        engine, *_ = deepspeed.initialize(model=parts.model, optimizer=parts.optimizer,
                                          lr_scheduler=parts.scheduler, config=ds)
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            state = _state(engine.module)
        result["vocab"] = engine.module.lm.config.vocab_size
        if rank == 0:
            torch.save(state, out + ".pt")
        torch.distributed.barrier()
    else:
        parts = build_training(train, cfg, 5)
        result["rng"] = torch.get_rng_state().tolist()
        result["vocab"] = parts.model.lm.config.vocab_size
        torch.save(_state(parts.model), out + ".pt")
    result["end"] = time.time()
    Path(out + ".json").write_text(json.dumps(result))


# ---------------------------------------------------------------- the test
def _pretrained_lm(directory: Path) -> None:
    """A small LLaMA with fewer rows than the tiny tokenizer (so HandsOnVLM resizes it) and a LLaVA-style
    mm_projector.bin (LM width 64, tower width 32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=SMALL_VOCAB,
                                 tie_word_embeddings=False)).save_pretrained(directory)
    torch.save({"model.mm_projector.weight": torch.randn(64, 32), "model.mm_projector.bias": torch.randn(64)},
               directory / "mm_projector.bin")


def test_zero3_ranks_never_hold_the_whole_model_and_start_from_the_plain_weights(tmp_path):
    import torch

    pretrained = tmp_path / "lm"
    _pretrained_lm(pretrained)
    env = isolated_env(MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    world = 2
    rendezvous = rendezvous_env(tmp_path, world)
    commands, outs = [], []
    for role, rank in [("rank", 0), ("rank", 1), ("plain", None)]:
        out = str(tmp_path / (f"rank{rank}" if role == "rank" else "plain"))
        rank_env = {} if rank is None else {**rendezvous, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        commands.append(([sys.executable, __file__, role, str(pretrained), out], {**env, **rank_env},
                         Path(out + ".log")))
        outs.append(out)
    run_to_completion(commands, timeout=540)
    ranks = [json.loads(Path(out + ".json").read_text()) for out in outs[:2]]
    plain = json.loads(Path(outs[2] + ".json").read_text())

    fp32 = 4 * plain["params"]
    assert all(r["params"] == plain["params"] for r in ranks) and fp32 > 2.5 * GIB
    numbers = {name: {k: round(v / fp32, 3) for k, v in r.items() if k in ("base", "build_peak", "build_end",
                                                                           "wrap_peak")}
               for name, r in zip(("rank0", "rank1", "plain"), [*ranks, plain])}
    t0 = min(r["start"] for r in [*ranks, plain])
    times = {name: {k: round(r[k] - t0, 1) for k in ("start", "built", "wrapped", "end") if k in r}
             for name, r in zip(("rank0", "rank1", "plain"), [*ranks, plain])}
    print(f"\nseconds since the first process started: {times}")
    print(f"peak RSS / fp32 size ({fp32 / GIB:.2f} GiB, {plain['params']:,} parameters): {numbers}")
    for r in ranks:
        assert r["base"] < 0.25 * fp32  # the fixed import overhead is small against the model
        assert r["build_peak"] < MAX_RATIO * fp32, numbers
        assert r["wrap_peak"] < MAX_RATIO * fp32, numbers
    assert plain["build_peak"] > PLAIN_MIN_RATIO * fp32, numbers

    # equality: every parameter of the model partitioned; the vision tower is none of them (it lives outside
    # the engine, whole: handsonvlm.vision.FrozenTower); the same weights and RNG as the plain build
    assert ranks[0]["whole"] == [] and not ranks[0]["tower_partitioned"]
    assert ranks[0]["vocab"] == ranks[1]["vocab"] == plain["vocab"] > SMALL_VOCAB
    assert ranks[0]["rng"] == ranks[1]["rng"] == plain["rng"]
    zero_state, plain_state = torch.load(outs[0] + ".pt"), torch.load(outs[2] + ".pt")
    assert sorted(zero_state) == sorted(plain_state)
    different = [k for k in plain_state if not torch.equal(zero_state[k], plain_state[k])]
    assert not different, different


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _main(*sys.argv[1:4])
