"""The training loop: config -> model, data, per-part optimizer, DeepSpeed (or plain torch) -> logs and checkpoints.

A plain engine loop rather than the transformers Trainer: the Trainer writes `checkpoint-N` in place and its
`get_last_checkpoint` picks the highest-numbered dir whether or not its save finished, so atomic checkpoints would
mean overriding its private `_save_checkpoint`; per-part lrs would mean overriding `create_optimizer` and its
DeepSpeed optimizer handling. Owning the loop makes the data position, RNG and engine state of a checkpoint
explicit, which is what exact resume needs: losses after kill -9 + resume equal an uninterrupted run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..checkpoint_layout import (
    RUN_CONFIG_FILE,
    CheckpointFormatError,
    checkpoint_dir_name,
    last_checkpoint,
    resolve_model_dir,
)
from ..data.dataset import dataset_lengths
from ..loading import CheckpointMismatchError
from .builders import DEFAULT_BUILDERS, Builders
from .checkpoint import clean_incomplete, load_checkpoint, save_checkpoint, saved_world_size
from .config import TrainConfig, load_config, save_config
from .contract import EpochDataset, SavedWithModel, check_trainable
from .data_order import epoch_batches
from .engine import build_engine, device, init_distributed, rank, world_size
from .lora import inject_lora
from .metrics import MetricsLog
from .pretrain_builders import STAGE0_BUILDERS
from .sharded import ShardedParameters
from .stages import Stage, apply_stage, get_stage, parameter_table

logger = logging.getLogger(__name__)

# stage -> builders when main() is given none; every other stage trains the multimodal model
STAGE_BUILDERS: dict[str, Builders] = {"stage0_pretrain": STAGE0_BUILDERS}


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch: the model build and dropout then repeat across runs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class StepPlan:
    """Batch geometry and schedule. A checkpoint's data position is a step count, so it only means the same samples
    under the same plan."""

    steps_per_epoch: int
    total_steps: int
    samples_per_step: int  # over all ranks

    @classmethod
    def for_run(cls, config: TrainConfig, num_samples: int) -> StepPlan:
        """Whole steps of `batch_size x grad_accum` per rank; a per-rank remainder is logged, never silently used."""
        o = config.optim
        per_rank = num_samples // world_size()
        steps_per_epoch = per_rank // (o.batch_size * o.grad_accum)
        if steps_per_epoch == 0:
            raise ValueError(
                f"{num_samples} samples on {world_size()} ranks give no full step of "
                f"batch_size={o.batch_size} x grad_accum={o.grad_accum}"
            )
        unused = per_rank - steps_per_epoch * o.batch_size * o.grad_accum
        if unused:
            logger.warning("%d samples per rank per epoch do not fill a step and are not used", unused)
        total = o.max_steps if o.max_steps is not None else o.epochs * steps_per_epoch
        return cls(steps_per_epoch, total, o.batch_size * o.grad_accum * world_size())


@dataclass
class Run:
    """Everything a run trains with, built once (`build_run`) in a fixed order so that seeds give the same run."""

    config: TrainConfig
    engine: Any  # a DeepSpeed engine or TorchEngine
    group_names: list[str]
    dataset: Dataset
    collate: Callable[[list], dict]
    lengths: list[int] | None  # per-sample token lengths with data.group_by_length
    plan: StepPlan
    frozen_abs_sum: float  # sum |w| of the frozen weights, which checkpoints do not hold
    processor: SavedWithModel | None
    lora_base: str | None
    sharded: ShardedParameters | None  # parameters whose rows differ per rank (stage 0's class centres)

    def lrs(self) -> list[float]:
        """The current learning rate of every group in `group_names` order."""
        return [*self.engine.lr_scheduler.get_last_lr(), *(self.sharded.last_lrs() if self.sharded else [])]


def _resume_path(config: TrainConfig) -> str | None:
    if config.resume == "auto":
        found = last_checkpoint(config.output_dir)
        return str(found) if found else None
    if config.resume is not None and not os.path.isdir(config.resume):
        raise FileNotFoundError(f"resume={config.resume!r}: no such checkpoint dir")
    return config.resume


def start_run(config: TrainConfig) -> str | None:
    """Process group, run folder (incomplete saves removed, config.yaml written) and seed; returns the checkpoint
    to resume from, if any."""
    if config.deepspeed is not None:
        init_distributed()
    os.makedirs(config.output_dir, exist_ok=True)
    resume = _resume_path(config)
    clean_incomplete(config.output_dir)
    if rank() == 0:
        save_config(config, os.path.join(config.output_dir, RUN_CONFIG_FILE))
    set_seed(config.optim.seed)
    return resume


def _enable_activation_checkpointing(model: nn.Module) -> None:
    if not model.supports_gradient_checkpointing:
        raise ValueError(f"model.gradient_checkpointing=true, but {type(model).__name__} does not support it")
    # non-reentrant: the reentrant variant drops gradients when the checkpointed inputs are frozen (LoRA, stage 1)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def _add_lora(config: TrainConfig, stage: Stage, model: nn.Module, processor) -> tuple[nn.Module, str]:
    """Adapters on the stage's target part, and the full-weight base folder that the adapter checkpoints name."""
    init = config.model.init_from
    # a concrete model folder, not a run folder whose "last checkpoint" may change later
    base = str(resolve_model_dir(init).resolve()) if init else os.path.join(config.output_dir, "base_model")
    if init is None and rank() == 0 and not os.path.isdir(base):
        model.save_pretrained(base)  # the adapter needs its full-weight base on disk for merge
        if processor is not None:
            processor.save_pretrained(base)
    return inject_lora(model, stage.lora), base


def frozen_abs_sum(model: nn.Module) -> float:
    """A checksum of the frozen weights: checkpoints hold only trainable ones, so a resume checks the rest matches."""
    return sum(float(p.detach().double().abs().sum()) for p in model.parameters() if not p.requires_grad)


def build_run(config: TrainConfig, builders: Builders, resume: str | None = None) -> Run:
    """Inputs, model (stage applied, LoRA added), data, step plan and engine, in the order the seed fixes; `resume`
    (the checkpoint the run will load) decides whether the engine must read another world size's state."""
    stage = get_stage(config.stage)
    inputs = builders.inputs(config)
    processor = inputs if isinstance(inputs, SavedWithModel) else None
    model = builders.model(config, inputs)
    check_trainable(model)
    if config.model.gradient_checkpointing:
        _enable_activation_checkpointing(model)
    lora_base = None
    if stage.lora is not None:
        model, lora_base = _add_lora(config, stage, model, processor)
    groups = apply_stage(model, stage, config.optional_parts, config.optim.weight_decay, config.optim.lr_scale)
    if rank() == 0:
        tqdm.write(f"stage {config.stage}\n{parameter_table(model)}")
    dataset = builders.dataset(config, inputs)
    collate = builders.collator(config, inputs)
    lengths = dataset_lengths(dataset) if config.data.group_by_length else None
    plan = StepPlan.for_run(config, len(dataset))
    frozen = frozen_abs_sum(model)
    # before the engine: it must never see them (taken out of the model and of `groups`)
    sharded = ShardedParameters(model, groups, config, plan.total_steps) if model.sharded_parameter_names() else None
    universal = resume is not None and saved_world_size(resume) != world_size()
    engine = build_engine(model, groups, config, plan.total_steps, universal)  # (partitions parameters under ZeRO-3)
    names = [g["name"] for g in groups] + (sharded.group_names if sharded else [])
    return Run(config, engine, names, dataset, collate, lengths, plan, frozen, processor, lora_base, sharded)


def resume_run(run: Run, path: str) -> int:
    """Restore a checkpoint into the run's engine and return its step, after checking it belongs to this run."""
    saved = load_checkpoint(run.engine, path, run.sharded)
    plan = run.plan
    if (saved["samples_per_step"], saved["total_steps"]) != (plan.samples_per_step, plan.total_steps):
        raise ValueError(
            f"{path}: saved with {saved['samples_per_step']} samples/step and {saved['total_steps']} steps, "
            f"now {plan.samples_per_step} and {plan.total_steps}: exact resume needs the same batch geometry and "
            "schedule"
        )
    if not math.isclose(saved["frozen_abs_sum"], run.frozen_abs_sum, rel_tol=1e-9):
        raise ValueError(
            f"{path}: the frozen weights differ from the run's (sum |w| {saved['frozen_abs_sum']!r} vs "
            f"{run.frozen_abs_sum!r}): model.* changed since the checkpoint was written"
        )
    logger.info("resumed from %s at step %d", path, saved["step"])
    return saved["step"]


def _to_device(batch: dict, dev: torch.device, float_dtype: torch.dtype | None) -> dict:
    """Move tensors; floating ones (pixel_values) also to the engine's parameter dtype under DeepSpeed bf16."""
    return {
        k: v.to(dev, dtype=float_dtype if float_dtype and v.is_floating_point() else None) if torch.is_tensor(v) else v
        for k, v in batch.items()
    }


def _throughput_units(batch: dict) -> torch.Tensor:
    """What the throughput counts: attention-mask tokens, the positions of packed rows, or images (stage 0)."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum().double()
    if "input_ids" in batch:
        return torch.tensor(float(batch["input_ids"].numel()), dtype=torch.float64, device=batch["input_ids"].device)
    return torch.tensor(float(batch["pixel_values"].shape[0]), dtype=torch.float64, device=batch["pixel_values"].device)


def train_step(run: Run, batches) -> tuple[float, float]:
    """One optimizer step of `grad_accum` micro-batches; returns the mean loss over ranks and the units per second."""
    o = run.config.optim
    dev = device()
    # DeepSpeed bf16 casts the module itself (TorchEngine autocasts instead): inputs must follow
    float_dtype = torch.bfloat16 if o.bf16 and run.config.deepspeed is not None else None
    # loss sum and unit count, on the device because NCCL reduces only device tensors
    start, stats = time.perf_counter(), torch.zeros(2, dtype=torch.float64, device=dev)
    for _ in range(o.grad_accum):
        batch = _to_device(next(batches), dev, float_dtype)
        loss = run.engine(**batch).loss
        run.engine.backward(loss)
        run.engine.step()
        stats += torch.stack([loss.detach().double(), _throughput_units(batch)])
    if run.sharded is not None:
        run.sharded.step()  # the engine's accumulation boundary is the last micro-batch's step
    if world_size() > 1:
        torch.distributed.all_reduce(stats)
    return stats[0].item() / (o.grad_accum * world_size()), stats[1].item() / (time.perf_counter() - start)


def _progress(run: Run, step: int) -> dict:
    """What a checkpoint records about where the run is."""
    plan = run.plan
    return {
        "step": step,
        "epoch": step // plan.steps_per_epoch,
        "samples_in_epoch": (step % plan.steps_per_epoch) * plan.samples_per_step,
        "samples_per_step": plan.samples_per_step,
        "total_steps": plan.total_steps,
        "frozen_abs_sum": run.frozen_abs_sum,
    }


def _epoch_batches(run: Run, step: int):
    """This rank's micro-batches from `step` to the end of its epoch (the epoch's earlier steps skipped)."""
    c, plan = run.config, run.plan
    epoch, done = divmod(step, plan.steps_per_epoch)
    if isinstance(run.dataset, EpochDataset):  # datasets that draw per epoch (stage-0 regions); depends on epoch only
        run.dataset.set_epoch(epoch)
    skip = done * c.optim.batch_size * c.optim.grad_accum
    return epoch_batches(
        run.dataset, run.collate, run.lengths, c.optim.batch_size, skip, c.optim.seed, epoch, c.data.num_workers
    )


def run_steps(run: Run, step: int) -> int:
    """Train from `step` to the plan's last step, logging each and saving every `save_steps`; returns the last step
    saved."""
    c, plan = run.config, run.plan
    log = MetricsLog(c.output_dir, c.logging_steps, run.group_names, step)
    bar = tqdm(total=plan.total_steps, initial=step, disable=rank() != 0, desc=c.stage)
    last_saved = step
    run.engine.module.train()
    while step < plan.total_steps:
        batches = _epoch_batches(run, step)
        for _ in range(plan.steps_per_epoch - step % plan.steps_per_epoch):
            loss, units_per_s = train_step(run, batches)
            step += 1
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step} (epoch {(step - 1) // plan.steps_per_epoch})")
            log.log(step, loss, run.lrs(), units_per_s, (step - 1) // plan.steps_per_epoch)
            bar.update(1)
            if step % c.save_steps == 0 or step == plan.total_steps:
                save_checkpoint(run.engine, c, _progress(run, step), run.processor, run.lora_base, run.sharded)
                last_saved = step
            if step == plan.total_steps:
                break
    bar.close()
    log.close()
    return last_saved


def train(config: TrainConfig, builders: Builders | None = None) -> str | None:
    """Run one training stage end to end (every rank calls it).

    Returns:
        The path of the final checkpoint on rank 0, None on other ranks.
    """
    builders = builders or STAGE_BUILDERS.get(config.stage, DEFAULT_BUILDERS)
    resume = start_run(config)
    run = build_run(config, builders, resume)
    step = resume_run(run, resume) if resume is not None else 0
    last_saved = run_steps(run, step)
    final = os.path.join(config.output_dir, checkpoint_dir_name(last_saved))
    return final if rank() == 0 else None


def main(argv: list[str] | None = None, builders: Builders | None = None) -> str | None:
    """`python -m rice_mllm.train --config recipes/X.yaml [a.b=value ...]`; builders None: the stage's own."""
    parser = argparse.ArgumentParser(prog="python -m rice_mllm.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML recipe; keys not given keep their defaults")
    parser.add_argument(
        "--local_rank",
        "--local-rank",
        type=int,
        default=None,
        help="set by the deepspeed launcher; LOCAL_RANK is read from the environment",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="a.b=value overrides, typed by the config fields")
    args = parser.parse_intermixed_args(argv)
    config = load_config(args.config, args.overrides)
    if args.print_config:
        print(json.dumps(dataclasses.asdict(config), indent=1))
        return None
    # the process group does not exist yet: the launcher's RANK tells which process logs
    logging.basicConfig(
        level=logging.INFO if int(os.environ.get("RANK", 0)) == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return train(config, builders)
    except (CheckpointFormatError, CheckpointMismatchError) as error:  # a bad model folder: one line, not a trace
        raise SystemExit(f"error: {error}") from None


def cli(argv: list[str] | None = None, builders: Builders | None = None) -> None:
    """The command-line entry: `main`, then the process group is torn down (one left to the interpreter's exit can
    abort it with "terminate called without an active exception")."""
    try:
        main(argv, builders)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
