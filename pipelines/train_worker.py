"""The Ray Train worker: DeepSpeed ZeRO fine-tuning of HandsOnVLM from the sample shards.

:class:`TrainRecipe` runs it as named steps over its state. Every rank draws the same epochs of
the task mixture and trains on its slice of each global batch, delivered by one
:class:`~preprocessing.training_data.DrawStream` for the whole run (rows read by clip index and
prepared in a background thread); the model, optimizer, schedule and mixture come from
:func:`handsonvlm.training.build_training` (shared with the benchmark's plain loop).
Every ``checkpoint_every`` steps all ranks save a DeepSpeed checkpoint plus their RNG state; a
re-run with the same run name (or Ray Train restarting failed workers) resumes exactly there
(step, optimizer, schedule, position in the epoch, RNG) and adds one to ``train/restarts``. Rank 0
logs to MLflow; at the end the model is exported with ``HandsOnVLM.save_pretrained``.

Test-only fault hook (:class:`KillOnceAfterStep`, for tests/test_reliability.py): with
``HANDSONVLM_FAULT_KILL_AT_STEP=N`` and ``HANDSONVLM_FAULT_MARKER=FILE`` the last rank SIGKILLs
itself right after step N, once (it creates FILE first; a restarted worker that finds FILE goes on).
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray.train
import torch
import torch.distributed as dist

from handsonvlm import checkpoints, networking
from handsonvlm.config import CONFIG_DIR, ModelConfig, TrainConfig
from handsonvlm.inference import enable_tf32
from handsonvlm.templates import TemplateSet
from handsonvlm.training import (
    LOSS_PARTS,
    TrainingParts,
    Zero3Init,
    build_training,
    fixed_batch_loss,
    resolve_attn_implementation,
    rows_to_batch,
)
from handsonvlm.validation import ValidationSet, validate_in_training
from pipelines.tracking import RESTARTS_METRIC, WorkerLogger
from preprocessing import storage
from preprocessing.training_data import (
    MB,
    DrawStream,
    FeatureLookup,
    RowStore,
    fixed_rows,
    micro_batches_per_epoch,
    total_steps,
)

RANK_STATE = checkpoints.RANK_STATE
CKPT_TAG = checkpoints.DEEPSPEED_TAG
FAULT_STEP_ENV = "HANDSONVLM_FAULT_KILL_AT_STEP"
FAULT_MARKER_ENV = "HANDSONVLM_FAULT_MARKER"
FAULT_POLL_WAIT_S = 1.5 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0"))
RANK_SEED_STRIDE = 1000  # rank r's CVAE noise is seeded seed * stride + r: one stream per rank and seed
CPU = torch.device("cpu")  # where the DrawStream prepares batches
MIN_WINDOW_S = 1e-9  # a log window's duration floor: the first window may end within the clock's resolution


def deepspeed_config(zero_stage: int, micro_batch: int, accumulation: int, world_size: int, bf16: bool,
                     max_grad_norm: float, hpz_partition_size: int | None = None, quantized_weights: bool = False,
                     quantized_gradients: bool = False) -> dict:
    """configs/deepspeed/zero{2,3}.json with the run's batch sizes and precision filled in, and ZeRO++
    (ZeRO-3 only, validated by TrainConfig): ``hpz_partition_size`` > 1 keeps a secondary weight partition
    within groups of that many ranks (hpZ); the quantized flags turn on qwZ / qgZ."""
    ds = json.loads((CONFIG_DIR / "deepspeed" / f"zero{zero_stage}.json").read_text())
    ds.update({"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": accumulation,
               "train_batch_size": micro_batch * accumulation * world_size, "gradient_clipping": max_grad_norm,
               "bf16": {"enabled": bf16}, "fp16": {"enabled": False}})
    zero_plus_plus = {"zero_hpz_partition_size": hpz_partition_size or 1, "zero_quantized_weights": quantized_weights,
                      "zero_quantized_gradients": quantized_gradients}
    if zero_stage == 3:
        ds["zero_optimization"].update(zero_plus_plus)
    elif zero_plus_plus != {"zero_hpz_partition_size": 1, "zero_quantized_weights": False,
                            "zero_quantized_gradients": False}:
        raise ValueError(f"ZeRO++ ({zero_plus_plus}) needs ZeRO stage 3, got stage {zero_stage}")
    return ds


@dataclass
class Progress:
    """Where training stands; saved with every checkpoint (as a dict, in the rank state file)."""

    step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches of this epoch already trained on
    samples: int = 0  # over all ranks


def save_checkpoint(engine, directory: str, rank: int, progress: Progress, generator: torch.Generator,
                    world_size: int) -> None:
    checkpoints.save_rank(engine, directory, rank, asdict(progress), generator, world_size)


def load_checkpoint(engine, directory: str, rank: int, generator: torch.Generator) -> Progress:
    return Progress(**checkpoints.load_rank(engine, directory, rank, generator))


StepHook = Callable[["TrainRecipe", int], None]  # called after each optimizer step with the step number


class KillOnceAfterStep:
    """The test-only fault hook of the module docstring: the last rank dies by SIGKILL after step N, once."""

    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, marker

    @classmethod
    def from_env(cls) -> KillOnceAfterStep | None:
        kill_at = os.environ.get(FAULT_STEP_ENV)
        if not kill_at:
            return None
        marker = os.environ.get(FAULT_MARKER_ENV)
        if not marker:
            raise RuntimeError(f"{FAULT_STEP_ENV} needs {FAULT_MARKER_ENV}: without it every restart would die again")
        return cls(int(kill_at), marker)

    def __call__(self, recipe: TrainRecipe, step: int) -> None:
        if recipe.rank != recipe.world - 1 or step != self.step:
            return
        try:
            with open(self.marker, "x") as f:  # exclusive create: only the first worker to get here fires
                f.write(f"rank {recipe.rank} pid {os.getpid()} killed after step {step}\n")
        except FileExistsError:
            return
        # Ray Train's controller collects reports when it polls the workers (every
        # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default): a worker that dies sooner after a report loses
        # it, and the restart resumes from the checkpoint before. The hook tests resuming from the LAST one,
        # so it lets one poll pass first (docs/RELIABILITY.md).
        time.sleep(FAULT_POLL_WAIT_S)
        print(f"[train] fault hook: rank {recipe.rank} (pid {os.getpid()}) kills itself after step {step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


class TrainRecipe:
    """One worker's training run: ``setup()``, ``restore()``, ``train()`` (``train_step()`` per
    micro-batch; ``log()``, ``checkpoint()`` and the step hooks at optimizer steps), ``export()``."""

    # set by setup()
    parts: TrainingParts
    engine: Any  # deepspeed.DeepSpeedEngine around parts.model (DeepSpeed is imported on the workers only)
    generator: torch.Generator  # CVAE noise of the training steps, one stream per rank
    features: FeatureLookup | None
    fixed_batch: dict[str, torch.Tensor]
    logger: WorkerLogger

    def __init__(self, config: dict):
        ctx = ray.train.get_context()
        self.config = config
        self.rank, self.world, local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
        self.train_cfg = TrainConfig.from_dict(config["train"])
        self.model_cfg = ModelConfig.from_dict(config["model"])
        self.plan: dict = config["plan"]
        self.use_cuda = torch.cuda.is_available()
        self.device = torch.device(f"cuda:{local_rank}" if self.use_cuda else "cpu")
        self.steps_per_epoch: int = self.plan["steps_per_epoch"]
        # The schedule spans the planned run (epochs x steps/epoch); max_steps only stops early, so a run
        # stopped at step 3 and resumed to step 6 matches one that ran 6 steps in one go.
        self.planned_steps = self.steps_per_epoch * self.train_cfg.epochs
        self.total_steps = total_steps(self.steps_per_epoch, self.train_cfg.epochs, self.train_cfg.max_steps)
        self.micro_per_step = self.train_cfg.gradient_accumulation_steps
        self.progress = Progress()
        self.resumed = False
        self.last_metrics: dict[str, float] = {}
        self.step_hooks: list[StepHook] = []
        # throughput since the last log line, and the ETA's reference point (set when train() starts)
        self.window_samples, self.window_start, self.start_time, self.start_step = 0, 0.0, 0.0, 0
        self.start_samples, self.first_step_time = 0, None  # the end-to-end rate counts from the first step

    def setup(self) -> None:
        """DeepSpeed-wrapped model, optimizer, schedule; mixture, CVAE noise, fixed batch, validation, logger, hooks."""
        import deepspeed

        train = self.train_cfg
        bf16 = train.precision == "bf16" or (train.precision == "auto" and self.use_cuda
                                             and torch.cuda.is_bf16_supported())
        resolve_attn_implementation(self.model_cfg, self.use_cuda)
        enable_tf32()  # the release trains with --tf32 True; a no-op without CUDA
        networking.set_subgroup_timeout(train.pg_timeout_s)  # DeepSpeed's own groups (hpZ's) time out as the world's
        networking.check_hpz_placement(train.zero_hpz_partition_size, ray.train.get_context().get_local_world_size(),
                                       self.world)
        ds_config = deepspeed_config(train.zero_stage, train.micro_batch_size, train.gradient_accumulation_steps,
                                     self.world, bf16, train.max_grad_norm, train.zero_hpz_partition_size,
                                     train.zero_quantized_weights, train.zero_quantized_gradients)
        # ZeRO-3: the model's parameters are partitioned over the ranks as they are created, so no rank ever
        # holds the whole model (docs/CLUSTER.md, "5. Scaling"); ZeRO-2 keeps a whole copy on every rank anyway
        init = Zero3Init(ds_config) if train.zero_stage == 3 else None
        self.parts = build_training(train, self.model_cfg, self.planned_steps, TemplateSet(**self.config["templates"]),
                                    init=init)
        # The frozen tower is not part of the module DeepSpeed wraps (handsonvlm.vision.FrozenTower): it runs on
        # this worker's device in model.vision.dtype, never cast, partitioned or optimised (docs/MODEL.md, "Precision")
        self.parts.model.vision.to(self.device)
        # DeepSpeed wraps the client optimizer and steps the client schedule inside engine.step()
        self.engine, _, _, _ = deepspeed.initialize(model=self.parts.model, optimizer=self.parts.optimizer,
                                                    lr_scheduler=self.parts.scheduler, config=ds_config)
        self.generator = torch.Generator(device=self.device).manual_seed(train.seed * RANK_SEED_STRIDE + self.rank)
        self.features = (FeatureLookup(**self.plan["features"], cache_bytes=train.feature_cache_mb * MB)
                         if self.plan.get("features") else None)
        self.store = RowStore(self.plan, train.row_cache_mb * MB)
        self.fixed_batch = self.to_device(self.batch(fixed_rows(self.plan, self.parts.mixture, self.store), 0))
        if self.rank == 0:
            source = "feature cache " + self.plan["features"]["key"] if self.features else "frames (online CLIP)"
            print(f"[train] vision input: {source}", flush=True)
        self.validation = ValidationSet.for_rank(self.plan.get("validation"), self.rank, self.model_cfg, train.seed)
        self.logger = WorkerLogger(self.config.get("mlflow"), self.rank, ray.train.get_context())
        fault = KillOnceAfterStep.from_env()
        if fault is not None:
            self.step_hooks.append(fault)

    def batch(self, rows: list[dict], epoch: int) -> dict[str, torch.Tensor]:
        """Drawn rows -> a model batch on the CPU (runs in the DrawStream's thread)."""
        batch, _ = rows_to_batch(rows, self.parts.model, self.parts.mixture, epoch, CPU, self.features)
        return batch

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def fixed_batch_loss(self) -> float:
        return fixed_batch_loss(self.engine.module, self.fixed_batch, forward=self.engine)

    def restore(self) -> None:
        """Resume from Ray Train's checkpoint if there is one, and record where the run starts."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            self.logger.log({"eval/fixed_batch_loss": self.fixed_batch_loss()}, 0)
            return
        self.resumed = True
        with self.checkpoint_files(checkpoint) as directory:
            self.progress = load_checkpoint(self.engine, directory, self.rank, self.generator)
        p = self.progress
        restored_loss = self.fixed_batch_loss()
        if self.rank == 0:
            print(f"[train] resumed at step {p.step} (epoch {p.epoch}, micro-batch {p.micro_in_epoch}); "
                  f"fixed-batch loss {restored_loss:.6f}", flush=True)
        restarts = self.logger.restarts_so_far() + 1
        self.logger.log({"restore/fixed_batch_loss": restored_loss, RESTARTS_METRIC: restarts}, p.step)

    def staging_dir(self) -> str:
        """``train.checkpoint_staging_dir`` (made if missing), else the system temp dir."""
        directory = self.train_cfg.checkpoint_staging_dir or tempfile.gettempdir()
        os.makedirs(directory, exist_ok=True)
        return directory

    def checkpoint_files(self, checkpoint: ray.train.Checkpoint):
        """:func:`handsonvlm.checkpoints.rank_checkpoint_dir` of ``checkpoint`` for this rank, logging ``restore/*``."""
        return checkpoints.rank_checkpoint_dir(checkpoint.filesystem, checkpoint.path, self.rank,
                                   ray.train.get_context().get_local_rank(), self.world, self.train_cfg.zero_stage,
                                   self.staging_dir(), self.logger.log)

    def train(self) -> None:
        """Micro-batches from where restore() left off until ``total_steps`` optimizer steps are done."""
        p, train = self.progress, self.train_cfg
        per_epoch = micro_batches_per_epoch(self.plan)
        self.start_time, self.start_step, self.start_samples = time.perf_counter(), p.step, p.samples
        self.window_samples, self.window_start = 0, time.perf_counter()
        self.engine.train()
        if p.step >= self.total_steps:
            return
        self.stream = stream = DrawStream(self.plan, self.parts.mixture, self.rank, self.store, self.batch, p.epoch,
                                          p.micro_in_epoch)
        self.window_wait_s, self.window_steps = 0.0, 0
        try:
            for epoch, micro, batch in stream:
                out = self.train_step(self.to_device(batch), epoch)
                # the position to resume from: the next micro-batch, in the next epoch after the last one
                p.epoch, p.micro_in_epoch = (epoch, micro + 1) if micro + 1 < per_epoch else (epoch + 1, 0)
                if (micro + 1) % self.micro_per_step:
                    continue  # accumulating gradients
                p.step += 1
                self.window_steps += 1
                if p.step % train.log_every == 0 or p.step == self.total_steps:
                    self.log(out, epoch)
                if p.step % train.checkpoint_every == 0 or p.step == self.total_steps:
                    self.checkpoint()
                for hook in self.step_hooks:
                    hook(self, p.step)
                if p.step >= self.total_steps:
                    break
        finally:
            stream.close()

    def train_step(self, batch: dict[str, torch.Tensor], epoch: int) -> dict[str, torch.Tensor]:
        """One micro-batch: forward, backward, and DeepSpeed's step (an optimizer step at the end of
        each accumulation window). Returns the forward's outputs."""
        out = self.engine(**batch, generator=self.generator)
        self.engine.backward(out["loss"])
        self.engine.step()
        samples = len(batch["input_ids"]) * self.world
        self.progress.samples += samples
        self.window_samples += samples
        if self.first_step_time is None:
            self.first_step_time = time.perf_counter()
        return out

    def log(self, out: dict[str, torch.Tensor], epoch: int) -> None:
        """The step's losses averaged over ranks, LR and throughput since the last log, to MLflow and stdout."""
        losses = torch.stack([out[k].detach().float() for k in LOSS_PARTS]).to(self.device)
        dist.all_reduce(losses)
        losses = (losses / self.world).tolist()
        now = time.perf_counter()
        rate = self.window_samples / max(now - self.window_start, MIN_WINDOW_S)
        self.window_samples, self.window_start = 0, now
        # mean wait per optimizer step for its batches: what the input pipeline cost the step in this window
        data_wait = (self.stream.waited_s - self.window_wait_s) / max(1, self.window_steps)
        self.window_wait_s, self.window_steps = self.stream.waited_s, 0
        step = self.progress.step
        # everything since the end of the first step: epoch boundaries, checkpoints, validation included
        since_first = self.progress.samples - self.start_samples - self.world * self.train_cfg.micro_batch_size
        end_to_end = since_first / max(now - self.first_step_time, MIN_WINDOW_S)
        self.last_metrics = {**{f"train/{k}": v for k, v in zip(LOSS_PARTS, losses)},
                             "train/lr": self.parts.scheduler.get_last_lr()[0], "train/samples_per_s": rate,
                             "train/samples_per_s_end_to_end": end_to_end, "train/data_wait_s": data_wait,
                             "train/epoch": epoch}
        self.logger.log(self.last_metrics, step)
        if self.rank == 0:
            eta = (self.total_steps - step) * (now - self.start_time) / max(1, step - self.start_step)
            print(f"[train] step {step}/{self.total_steps} | epoch {epoch} | loss {losses[0]:.4f} "
                  f"(text {losses[1]:.4f}, traj {losses[2]:.4f}, kl {losses[3]:.2f}) | "
                  f"{rate:.1f} samples/s | ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}", flush=True)

    def checkpoint(self) -> None:
        """Fixed-batch loss, validation (rank 0), then every rank saves and reports its checkpoint."""
        loss = self.fixed_batch_loss()
        p = self.progress
        val = validate_in_training(self.engine, self.validation, self.device)
        self.logger.log({"eval/fixed_batch_loss": loss, **val}, p.step)
        # The upload to the run's storage is asynchronous: training goes on once the local save is done.
        # Ray deletes the directory after the upload, so it must outlive this call (not a TemporaryDirectory,
        # which an async upload finds gone: docs/RELIABILITY.md).
        # It is made in train.checkpoint_staging_dir: at 7B a rank's shards are ~12 GB (docs/RELIABILITY.md).
        directory = tempfile.mkdtemp(prefix=f"ckpt-{p.step}-rank{self.rank}-", dir=self.staging_dir())
        start = time.perf_counter()
        save_checkpoint(self.engine, directory, self.rank, p, self.generator, self.world)
        dist.barrier()
        saved_s = time.perf_counter() - start
        size = sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())
        total = torch.tensor([size], dtype=torch.int64, device=self.device)
        dist.all_reduce(total)  # what the upload moves: every rank's files
        self.logger.log({"checkpoint/save_s": saved_s, "checkpoint/rank0_bytes": size,
                         "checkpoint/total_bytes": int(total.item())}, p.step)
        report = {**{k.replace("/", "_"): v for k, v in {**self.last_metrics, **val}.items()}, "step": p.step,
                  "epoch": p.epoch, "fixed_batch_loss": loss}
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)

    def export(self) -> None:
        """Gather the (possibly ZeRO-3-partitioned) weights and save the plain model from rank 0."""
        import deepspeed
        export_path = self.config["export_path"]
        with deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None):
            if self.rank == 0:
                storage.write_dir(export_path, self.parts.model.save_pretrained)  # a URI: via a local folder
                print(f"[train] exported {export_path}", flush=True)
        dist.barrier()

    def run(self) -> None:
        self.setup()
        self.logger.tag_worker_nodes()  # the Ray nodes the workers run on, as the run's tag worker_nodes
        self.restore()
        self.train()
        if self.resumed and self.progress.step == self.total_steps and not self.last_metrics:
            self.checkpoint()  # resumed after the end: report the restored state so the run has a final result
        self.export()
        self.logger.close()


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry point on every worker (``config``: model, train, plan, export_path, mlflow)."""
    TrainRecipe(config).run()
