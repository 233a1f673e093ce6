"""The Ray Train worker loop: DeepSpeed ZeRO fine-tuning of HandsOnVLM from the sample shards.

Each worker reads its own, deterministic part of the shards with Ray Data (files are assigned to
ranks by the driver, balanced by rows; the order is re-drawn per epoch from the seed), builds
conversations with the seeded task mixture, and trains the DeepSpeed-wrapped model. Every
``checkpoint_every`` steps all ranks save a DeepSpeed checkpoint plus their RNG state and report
it to Ray Train; a re-run with the same run name resumes exactly where the last checkpoint left
off (step, optimizer and scheduler state, position in the epoch, RNG). Rank 0 logs to MLflow and
prints one progress line every ``log_every`` steps; at the end the consolidated model is exported
with ``HandsOnVLM.save_pretrained`` (loadable without DeepSpeed or Ray).

Every restore from a checkpoint (a re-run with the same name, or Ray Train restarting the workers
after a failure, ``--max-failures``) adds one to the run's ``train/restarts`` metric, logged at the
step training resumes from.

Test-only fault hook: with ``HANDSONVLM_FAULT_KILL_AT_STEP=N`` and ``HANDSONVLM_FAULT_MARKER=FILE``
in the workers' environment, the last rank SIGKILLs its own process right after step N, once: it
creates FILE first, and a worker that finds FILE does not kill itself again (the restarted workers
pass step N again). tests/test_reliability.py uses it to check the restart path end to end.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RANK_STATE = "rank_{rank}_state.pt"
CKPT_TAG = "ckpt"
FIXED_BATCH_SEED = 1234  # CVAE noise of the fixed-batch loss, identical before and after a restore
RESTARTS_METRIC = "train/restarts"
FAULT_STEP_ENV = "HANDSONVLM_FAULT_KILL_AT_STEP"
FAULT_MARKER_ENV = "HANDSONVLM_FAULT_MARKER"
TRAIN_COLUMNS = ["sample_id", "narration", "narration_paraphrases", "noun", "rbhp_questions",
                 "future_hands", "future_valid", "obs_jpeg"]


# ---------------------------------------------------------------------------------------------
# plan (driver side, no Ray Train): which files each rank reads, how many steps per epoch
# ---------------------------------------------------------------------------------------------
def plan_data(samples_dir: str, world_size: int, micro_batch: int, accumulation: int) -> dict:
    """Assign sample shards to ranks, balancing rows (largest file to the lightest rank).

    Reads only Parquet footers. Every rank runs the same number of micro-batches per epoch (the
    smallest rank's), so collectives never wait for a rank that ran out of data.
    """
    import pyarrow.parquet as pq

    from preprocessing import storage

    files = storage.list_files(samples_dir, ".parquet")
    if not files:
        raise FileNotFoundError(f"no sample shards in {samples_dir}; run pipelines/preprocess.py first")
    rows = {}
    for uri in files:
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            rows[uri] = pq.ParquetFile(f).metadata.num_rows
    assignment = [[] for _ in range(world_size)]
    load = [0] * world_size
    for uri in sorted(files, key=lambda u: (-rows[u], u)):
        r = int(np.argmin(load))
        assignment[r].append(uri)
        load[r] += rows[uri]
    micro_steps = min(load) // micro_batch
    steps_per_epoch = micro_steps // accumulation
    if steps_per_epoch == 0:
        raise ValueError(f"too little data: {min(load)} rows on the smallest of {world_size} ranks ({len(files)} shards; "
                         f"shards are assigned whole, one video each) for "
                         f"micro-batch {micro_batch} x accumulation {accumulation}")
    return {"files": [sorted(a) for a in assignment], "rows": load, "steps_per_epoch": steps_per_epoch,
            "total_rows": sum(rows.values()), "fixed_batch_file": sorted(files)[0]}


def lr_lambda(total_steps: int, warmup_ratio: float, schedule: str):
    """Linear warm-up then cosine decay to 0 (or constant), as the release's HF cosine schedule."""
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def deepspeed_config(zero_stage: int, micro_batch: int, accumulation: int, world_size: int, bf16: bool,
                     max_grad_norm: float) -> dict:
    """configs/deepspeed/zero{2,3}.json with the run's batch sizes and precision filled in."""
    from handsonvlm.config import CONFIG_DIR

    ds = json.loads((CONFIG_DIR / "deepspeed" / f"zero{zero_stage}.json").read_text())
    ds.update({"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": accumulation,
               "train_batch_size": micro_batch * accumulation * world_size, "gradient_clipping": max_grad_norm,
               "bf16": {"enabled": bf16}, "fp16": {"enabled": False}})
    return ds


# ---------------------------------------------------------------------------------------------
# data on a worker
# ---------------------------------------------------------------------------------------------
def epoch_files(files: list[str], seed: int, epoch: int, rank: int) -> list[str]:
    order = np.random.default_rng([seed, epoch, rank]).permutation(len(files))
    return [files[i] for i in order]


class FeatureLookup:
    """Cached frozen-vision features (``pipelines/preprocess.py --stage features``) for rows of the
    sample shards, read a shard at a time and kept for the last few shards (files are read in order)."""

    KEEP_SHARDS = 2

    def __init__(self, out: str, key: str, split: str):
        self.out, self.key, self.split = out, key, split
        self.tables: dict[str, object] = {}

    def __call__(self, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """rows (with their shard ``path``) -> frame_means [B, F, C], frame_grids [B, F, G, C] float32."""
        from preprocessing.features import align_features, read_feature_table

        means, grids = [None] * len(rows), [None] * len(rows)
        by_shard: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            by_shard.setdefault(Path(row["path"]).name[: -len(".parquet")], []).append(i)
        for shard_id, idx in by_shard.items():
            if shard_id not in self.tables:
                if len(self.tables) >= self.KEEP_SHARDS:
                    self.tables.pop(next(iter(self.tables)))
                self.tables[shard_id] = read_feature_table(self.out, self.key, self.split, shard_id)
            m, g, present = align_features(self.tables[shard_id], [rows[i]["sample_id"] for i in idx])
            if not present.all():
                raise KeyError(f"feature shard {shard_id} lacks {int((~present).sum())} of its samples; "
                               f"re-run the features stage or set train.feature_cache=off")
            for j, i in enumerate(idx):
                means[i], grids[i] = m[j], g[j]
        return torch.from_numpy(np.stack(means)), torch.from_numpy(np.stack(grids))


def feature_cache_plan(data_root: str, split: str, files: list[str], model_cfg: dict, mode: str) -> dict | None:
    """Use the feature cache when every sample shard has a current feature shard (mode "auto"),
    insist on it ("on"), or ignore it ("off")."""
    if mode == "off":
        return None
    from handsonvlm.config import ModelConfig
    from preprocessing.features import feature_key, feature_shard_current

    key = feature_key(ModelConfig.from_dict(model_cfg))
    stale = [f for f in files if not feature_shard_current(data_root, key, split, Path(f).name[: -len(".parquet")])]
    if stale:
        if mode == "on":
            raise FileNotFoundError(f"train.feature_cache=on but {len(stale)} of {len(files)} shards have no current "
                                    f"features under {data_root}/features/{key}; run --stage features")
        return None
    return {"out": data_root, "key": key, "split": split}


def iter_rows(files: list[str], micro_batch: int, seed: int, epoch: int, rank: int):
    """Micro-batches of rows (lists of dicts) of this rank's files for one epoch, deterministic.

    Ray Data reads the files in the epoch's order (order preserved) and shuffles locally with a
    seeded buffer, so a resumed run sees exactly the same batches."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ds = ray.data.read_parquet(epoch_files(files, seed, epoch, rank), columns=TRAIN_COLUMNS, include_paths=True,
                               ray_remote_args={"num_cpus": 0.25})
    for batch in ds.iter_batches(batch_size=micro_batch, batch_format="pyarrow", drop_last=True,
                                 local_shuffle_buffer_size=4 * micro_batch,
                                 local_shuffle_seed=int(np.random.default_rng([seed, epoch, rank, 1]).integers(2**31))):
        yield batch.to_pylist()


def rows_to_batch(rows: list[dict], model, mixture, epoch: int, device,
                  features: FeatureLookup | None = None) -> tuple[dict, list[str]]:
    from handsonvlm.data import collate, max_text_tokens
    from handsonvlm.mixture import make_example

    examples, tasks = [], []
    frames_fn = (lambda row: None) if features is not None else None  # noqa: E731  (no JPEG decoding)
    for row in rows:
        example = make_example(row, model.cfg, model.tokenizer, mixture, epoch, frames_fn=frames_fn,
                               image_size=model.vision.image_size)
        examples.append(example)
        tasks.append(example.task)
    n_visual = model.cfg.num_video_frames + model.cfg.num_slow_frames * (model.vision.grid // model.cfg.spatial_pool) ** 2
    batch = collate(examples, model.tokens.pad, max_text=max_text_tokens(model.cfg, n_visual))
    if features is not None:
        batch["frame_means"], batch["frame_grids"] = features(rows)
    return {k: v.to(device) for k, v in batch.items()}, tasks


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
def save_checkpoint(engine, directory: str, rank: int, state: dict, generator: torch.Generator) -> None:
    engine.save_checkpoint(directory, tag=CKPT_TAG, client_state={"progress": state})
    torch.save({"progress": state, "torch_rng": torch.get_rng_state(), "generator": generator.get_state()},
               os.path.join(directory, RANK_STATE.format(rank=rank)))


def load_checkpoint(engine, directory: str, rank: int, generator: torch.Generator) -> dict:
    engine.load_checkpoint(directory, tag=CKPT_TAG)
    saved = torch.load(os.path.join(directory, RANK_STATE.format(rank=rank)), weights_only=True)
    torch.set_rng_state(saved["torch_rng"])
    generator.set_state(saved["generator"])
    return dict(saved["progress"])


def fixed_batch_loss(engine, batch: dict) -> float:
    """Loss on a fixed batch with fixed CVAE noise: the same value before a save and after a restore."""
    was_training = engine.module.training
    engine.module.eval()
    with torch.no_grad():
        out = engine(**batch, generator=torch.Generator(device=batch["input_ids"].device).manual_seed(FIXED_BATCH_SEED))
    engine.module.train(was_training)
    return float(out["loss"])


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
def train_loop_per_worker(config: dict) -> None:
    import deepspeed
    import ray.train
    import torch.distributed as dist

    from handsonvlm.config import ModelConfig, TrainConfig
    from handsonvlm.mixture import Mixture
    from handsonvlm.model import HandsOnVLM

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    train = TrainConfig.from_dict(config["train"])
    cfg = ModelConfig.from_dict(config["model"])
    plan = config["plan"]
    use_cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{ray.train.get_context().get_local_rank()}" if use_cuda else "cpu")
    bf16 = train.precision == "bf16" or (train.precision == "auto" and use_cuda and torch.cuda.is_bf16_supported())
    if cfg.lm.attn_implementation == "auto":
        cfg.lm.attn_implementation = "flash_attention_2" if use_cuda and _has_flash_attn() else "sdpa"

    torch.manual_seed(train.seed)  # identical initial weights on every rank
    model = HandsOnVLM(cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=train.lr, betas=train.betas, eps=train.eps,
                                  weight_decay=train.weight_decay)
    steps_per_epoch = plan["steps_per_epoch"]
    # The schedule spans the planned run (epochs x steps/epoch); max_steps only stops early, so a run
    # stopped at step 3 and resumed to step 6 matches one that ran 6 steps in one go.
    planned_steps = steps_per_epoch * train.epochs
    total_steps = min(train.max_steps or planned_steps, planned_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(planned_steps, train.warmup_ratio,
                                                                       train.lr_schedule))
    ds_config = deepspeed_config(train.zero_stage, train.micro_batch_size, train.gradient_accumulation_steps,
                                 world, bf16, train.max_grad_norm)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    mixture = Mixture.from_config(train.to_dict(), model_cfg=cfg)
    generator = torch.Generator(device=device).manual_seed(train.seed * 1000 + rank)

    features = FeatureLookup(**plan["features"]) if plan.get("features") else None
    fixed_rows = _fixed_rows(plan["fixed_batch_file"], train.micro_batch_size)
    fixed_batch, _ = rows_to_batch(fixed_rows, model, mixture, 0, device, features)
    if rank == 0:
        print(f"[train] vision input: {'feature cache ' + plan['features']['key'] if features else 'frames (online CLIP)'}",
              flush=True)

    progress = {"step": 0, "epoch": 0, "micro_in_epoch": 0, "samples": 0}
    checkpoint = ray.train.get_checkpoint()
    restored_loss = None
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            progress = load_checkpoint(engine, directory, rank, generator)
        restored_loss = fixed_batch_loss(engine, fixed_batch)
        if rank == 0:
            print(f"[train] resumed at step {progress['step']} (epoch {progress['epoch']}, "
                  f"micro-batch {progress['micro_in_epoch']}); fixed-batch loss {restored_loss:.6f}", flush=True)

    logger = _MlflowLogger(config.get("mlflow"), rank)
    if progress["step"] == 0 and checkpoint is None:
        logger.log({"eval/fixed_batch_loss": fixed_batch_loss(engine, fixed_batch)}, 0)
    if restored_loss is not None:
        restarts = logger.restarts_so_far() + 1
        logger.log({"restore/fixed_batch_loss": restored_loss, RESTARTS_METRIC: restarts}, progress["step"])

    micro_per_step = train.gradient_accumulation_steps
    start, start_step = time.perf_counter(), progress["step"]
    window_samples, window_start = 0, time.perf_counter()
    engine.train()
    last_metrics: dict = {}
    while progress["step"] < total_steps:
        epoch = progress["epoch"]
        skip = progress["micro_in_epoch"]
        for i, rows in enumerate(iter_rows(plan["files"][rank], train.micro_batch_size, train.seed, epoch, rank)):
            if i < skip:
                continue  # already trained on before the restore
            if i >= steps_per_epoch * micro_per_step or progress["step"] >= total_steps:
                break
            batch, _ = rows_to_batch(rows, model, mixture, epoch, device, features)
            out = engine(**batch, generator=generator)
            engine.backward(out["loss"])
            engine.step()
            progress["micro_in_epoch"] = i + 1
            progress["samples"] += len(rows) * world
            window_samples += len(rows) * world
            if (i + 1) % micro_per_step:
                continue
            progress["step"] += 1
            step = progress["step"]
            if step % train.log_every == 0 or step == total_steps:
                parts = torch.stack([out["loss"].detach().float(), out["text_loss"].float(),
                                     out["traj_loss"].float(), out["kl_loss"].float()]).to(device)
                dist.all_reduce(parts)
                parts = (parts / world).tolist()
                now = time.perf_counter()
                rate = window_samples / max(now - window_start, 1e-9)
                window_samples, window_start = 0, now
                last_metrics = {"train/loss": parts[0], "train/text_loss": parts[1], "train/traj_loss": parts[2],
                                "train/kl_loss": parts[3], "train/lr": scheduler.get_last_lr()[0],
                                "train/samples_per_s": rate, "train/epoch": epoch}
                logger.log(last_metrics, step)
                if rank == 0:
                    eta = (total_steps - step) * (now - start) / max(1, step - start_step)
                    print(f"[train] step {step}/{total_steps} | epoch {epoch} | loss {parts[0]:.4f} "
                          f"(text {parts[1]:.4f}, traj {parts[2]:.4f}, kl {parts[3]:.2f}) | "
                          f"{rate:.1f} samples/s | ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}", flush=True)
            if step % train.checkpoint_every == 0 or step == total_steps:
                _report_checkpoint(engine, rank, progress, generator, fixed_batch, last_metrics, logger)
            _maybe_inject_fault(step, rank, world)
        if progress["step"] < total_steps:
            progress["epoch"] += 1
            progress["micro_in_epoch"] = 0
    if checkpoint is not None and progress["step"] == total_steps and not last_metrics:
        # resumed after the end: report the restored state so the run still has a final result
        _report_checkpoint(engine, rank, progress, generator, fixed_batch, {}, logger)
    _export(engine, model, config["export_path"], rank)
    logger.close()


def _report_checkpoint(engine, rank, progress, generator, fixed_batch, metrics, logger) -> None:
    import ray.train
    import torch.distributed as dist

    loss = fixed_batch_loss(engine, fixed_batch)
    logger.log({"eval/fixed_batch_loss": loss}, progress["step"])
    with tempfile.TemporaryDirectory() as directory:
        save_checkpoint(engine, directory, rank, dict(progress), generator)
        dist.barrier()
        report = {**{k.replace("/", "_"): v for k, v in metrics.items()}, "step": progress["step"],
                  "epoch": progress["epoch"], "fixed_batch_loss": loss}
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _maybe_inject_fault(step: int, rank: int, world: int) -> None:
    """The test-only fault hook of the module docstring: the last rank dies by SIGKILL after step N, once."""
    kill_at = os.environ.get(FAULT_STEP_ENV)
    if not kill_at or rank != world - 1 or step != int(kill_at):
        return
    marker = os.environ.get(FAULT_MARKER_ENV)
    if not marker:
        raise RuntimeError(f"{FAULT_STEP_ENV} needs {FAULT_MARKER_ENV}: without it every restart would die again")
    try:
        with open(marker, "x") as f:  # exclusive create: only the first worker to get here fires
            f.write(f"rank {rank} pid {os.getpid()} killed after step {step}\n")
    except FileExistsError:
        return
    import signal

    print(f"[train] fault hook: rank {rank} (pid {os.getpid()}) kills itself after step {step}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _export(engine, model, export_path: str, rank: int) -> None:
    """Gather the (possibly ZeRO-3-partitioned) weights and save the plain model from rank 0."""
    import deepspeed
    import torch.distributed as dist

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        if rank == 0:
            model.save_pretrained(export_path)
            print(f"[train] exported {export_path}", flush=True)
    dist.barrier()


def _fixed_rows(uri: str, count: int) -> list[dict]:
    import pyarrow.parquet as pq

    from preprocessing import storage

    fs, path = storage.resolve(uri)
    rows = pq.read_table(path, filesystem=fs, columns=TRAIN_COLUMNS).slice(0, count).to_pylist()
    return [{**row, "path": path} for row in rows]


def _has_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401

        return True
    except ImportError:
        return False


class _MlflowLogger:
    """Rank 0 logs metrics to the run the driver created; other ranks log nothing."""

    def __init__(self, settings: dict | None, rank: int):
        self.client = None
        if settings and rank == 0:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=settings["tracking_uri"])
            self.run_id = settings["run_id"]

    def log(self, metrics: dict, step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def restarts_so_far(self) -> int:
        """Restores this MLflow run has recorded so far (kept in the run itself, so the count survives
        worker restarts and re-runs alike)."""
        if self.client is None:
            return 0
        return int(max((m.value for m in self.client.get_metric_history(self.run_id, RESTARTS_METRIC)), default=0))

    def close(self) -> None:
        self.client = None


def export_path_for(export_dir: str, run_name: str) -> str:
    return str(Path(export_dir).absolute() / run_name)
