"""The training loop: config -> model, data, per-part optimizer, DeepSpeed (or plain torch) -> logs and checkpoints.

A plain engine loop rather than the transformers Trainer: the Trainer writes `checkpoint-N` in place and its
`get_last_checkpoint` picks the highest-numbered dir whether or not its save finished, so atomic checkpoints would
mean overriding its private `_save_checkpoint`; per-part lrs would mean overriding `create_optimizer` and its
DeepSpeed optimizer handling. Owning the loop (~200 lines) makes the data position, RNG and engine state of a
checkpoint explicit, which is what exact resume needs: losses after kill -9 + resume equal an uninterrupted run.
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

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.dataset import dataset_lengths
from ..data.packing import LengthGroupedSampler
from .builders import DEFAULT_BUILDERS, Builders
from .checkpoint import clean_incomplete, find_resume_checkpoint, load_checkpoint, resolve_model_dir, save_checkpoint
from .config import TrainConfig, load_config, save_config
from .engine import build_engine, device, init_distributed, rank, world_size
from .lora import inject_lora
from .pretrain_builders import STAGE0_BUILDERS
from .stages import apply_stage, get_stage, parameter_table

logger = logging.getLogger(__name__)

# stage -> builders when main() is given none; every other stage trains the multimodal model
STAGE_BUILDERS: dict[str, Builders] = {"stage0_pretrain": STAGE0_BUILDERS}


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch: the model build and dropout then repeat across runs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_indices(num_samples: int, seed: int, epoch: int) -> list[int]:
    """This rank's sample order for one epoch: a seeded permutation, strided over ranks, cut to equal lengths.

    Equal lengths matter: a rank with one more batch would wait forever in a ZeRO collective.
    """
    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    per_rank = num_samples // world_size()
    return perm[rank() :: world_size()][:per_rank]


def grouped_epoch_indices(lengths: list[int], micro: int, seed: int, epoch: int) -> list[int]:
    """This rank's order for one epoch in micro-batches of similar token length (`data.group_by_length`).

    Global batches of micro * world_size records come from LengthGroupedSampler and each is cut into one slice per
    rank, so every rank's micro-batch pads little and all ranks run the same number of steps. The short last batch
    is dropped, as the plain order drops the epoch's remainder.
    """
    sampler = LengthGroupedSampler(lengths, micro * world_size(), seed=seed)
    sampler.set_epoch(epoch)
    full = [batch for batch in sampler.batches() if len(batch) == micro * world_size()]
    return [index for batch in full for index in batch[rank() * micro : (rank() + 1) * micro]]


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


def _resume_path(config: TrainConfig) -> str | None:
    if config.resume == "auto":
        found = find_resume_checkpoint(config.output_dir)
        return str(found) if found else None
    if config.resume is not None and not os.path.isdir(config.resume):
        raise FileNotFoundError(f"resume={config.resume!r}: no such checkpoint dir")
    return config.resume


class _Logger:
    """Console (rank 0, every `logging_steps`), TensorBoard and `metrics.jsonl` in the output dir."""

    def __init__(self, config: TrainConfig, group_names: list[str], start_step: int):
        self.config, self.names, self.writer, self.file = config, group_names, None, None
        if rank() == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(config.output_dir, "tensorboard"), purge_step=start_step + 1)
            path = os.path.join(config.output_dir, "metrics.jsonl")
            # steps logged after the checkpoint we resume from are replayed: drop their old records
            kept = []
            if os.path.exists(path):
                with open(path) as f:
                    kept = [line for line in f if json.loads(line)["step"] <= start_step]
            self.file = open(path, "w")
            self.file.writelines(kept)

    def log(self, step: int, loss: float, lrs: list[float], tokens_per_s: float, epoch: int) -> None:
        if rank() != 0:
            return
        record = {
            "step": step,
            "epoch": epoch,
            "loss": loss,
            "tokens_per_s": tokens_per_s,
            "lr": dict(zip(self.names, lrs, strict=True)),
        }
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/tokens_per_s", tokens_per_s, step)
        for name, lr in record["lr"].items():
            self.writer.add_scalar(f"train/lr/{name}", lr, step)
        if step % self.config.logging_steps == 0:
            lr_text = " ".join(f"{n}={v:.2e}" for n, v in record["lr"].items())
            tqdm.write(f"step {step} loss {loss:.4f} lr {lr_text} tok/s {tokens_per_s:.0f}")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.file.close()


def train(config: TrainConfig, builders: Builders | None = None) -> str | None:
    """Run one training stage end to end (every rank calls it).

    Returns:
        The path of the final checkpoint on rank 0, None on other ranks.
    """
    builders = builders or STAGE_BUILDERS.get(config.stage, DEFAULT_BUILDERS)
    if config.deepspeed is not None:
        init_distributed()
    stage = get_stage(config.stage)
    os.makedirs(config.output_dir, exist_ok=True)
    resume = _resume_path(config)
    clean_incomplete(config.output_dir)
    if rank() == 0:
        save_config(config, os.path.join(config.output_dir, "config.yaml"))
    set_seed(config.optim.seed)
    processor = builders.processor(config)
    model = builders.model(config, processor)
    sharded = getattr(model, "sharded_parameter_names", list)()
    if sharded and world_size() > 1:
        # the engine averages every gradient over ranks, which would mix rows that are different classes per rank
        raise NotImplementedError(
            f"{world_size()} ranks, but {sharded} hold different rows per rank (sharded class centres) and the "
            "trainer has no per-rank optimizer for them yet: run stage 0 in one process"
        )
    if config.model.gradient_checkpointing:
        # non-reentrant: the reentrant variant drops gradients when the checkpointed inputs are frozen (LoRA, stage 1)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    lora_base = None
    if stage.lora is not None:
        # a concrete model dir, not a run dir whose "last checkpoint" may change later
        init = config.model.init_from
        lora_base = str(resolve_model_dir(init).resolve()) if init else os.path.join(config.output_dir, "base_model")
        if config.model.init_from is None and rank() == 0 and not os.path.isdir(lora_base):
            model.save_pretrained(lora_base)  # the adapter needs its full-weight base on disk for merge
            if hasattr(processor, "save_pretrained"):
                processor.save_pretrained(lora_base)
        model = inject_lora(model, stage.lora)
    groups = apply_stage(model, stage, config.optional_parts, config.optim.weight_decay, config.optim.lr_scale)
    if rank() == 0:
        tqdm.write(f"stage {config.stage}\n{parameter_table(model)}")
    dataset = builders.dataset(config, processor)
    collate = builders.collator(config, processor)
    lengths = dataset_lengths(dataset) if config.data.group_by_length else None

    o = config.optim
    per_rank = len(dataset) // world_size()
    steps_per_epoch = per_rank // (o.batch_size * o.grad_accum)
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(dataset)} samples on {world_size()} ranks give no full step of "
            f"batch_size={o.batch_size} x grad_accum={o.grad_accum}"
        )
    unused = per_rank - steps_per_epoch * o.batch_size * o.grad_accum
    if unused:
        logger.warning("%d samples per rank per epoch do not fill a step and are not used", unused)
    total_steps = o.max_steps if o.max_steps is not None else o.epochs * steps_per_epoch
    # checkpoints hold only trainable weights: the frozen ones come from the build, so a resume checks they match
    frozen = sum(float(p.detach().double().abs().sum()) for p in model.parameters() if not p.requires_grad)
    engine = build_engine(model, groups, config, total_steps)  # (partitions parameters under ZeRO-3)

    step, samples_per_step = 0, o.batch_size * o.grad_accum * world_size()
    if resume is not None:
        saved = load_checkpoint(engine, resume)
        # the data position is a step count: it only means the same samples under the same batch geometry
        if (saved["samples_per_step"], saved["total_steps"]) != (samples_per_step, total_steps):
            raise ValueError(
                f"{resume}: saved with {saved['samples_per_step']} samples/step and {saved['total_steps']} steps, "
                f"now {samples_per_step} and {total_steps}: exact resume needs the same batch geometry and schedule"
            )
        if not math.isclose(saved["frozen_abs_sum"], frozen, rel_tol=1e-9):
            raise ValueError(
                f"{resume}: the frozen weights differ from the run's (sum |w| {saved['frozen_abs_sum']!r} vs "
                f"{frozen!r}): model.* changed since the checkpoint was written"
            )
        step = saved["step"]
        logger.info("resumed from %s at step %d", resume, step)
    log = _Logger(config, [g["name"] for g in groups], step)
    bar = tqdm(total=total_steps, initial=step, disable=rank() != 0, desc=config.stage)
    dev, last_saved, micro = device(), step, o.batch_size
    # DeepSpeed bf16 casts the module itself (TorchEngine autocasts instead): inputs must follow
    float_dtype = torch.bfloat16 if o.bf16 and config.deepspeed is not None else None
    engine.module.train()
    while step < total_steps:
        epoch, done = divmod(step, steps_per_epoch)
        if hasattr(dataset, "set_epoch"):  # datasets that draw per epoch (stage-0 regions); depends on epoch only
            dataset.set_epoch(epoch)
        if lengths is None:
            order = epoch_indices(len(dataset), o.seed, epoch)
        else:
            order = grouped_epoch_indices(lengths, micro, o.seed, epoch)
        order = order[done * micro * o.grad_accum :]
        # a private generator: creating a loader iterator otherwise draws from the global RNG, so a resumed run
        # (one extra iterator) would get other dropout masks than the uninterrupted one
        batches = iter(
            DataLoader(
                dataset,
                batch_size=micro,
                sampler=order,
                collate_fn=collate,
                drop_last=True,
                num_workers=config.data.num_workers,
                generator=torch.Generator().manual_seed(o.seed + epoch),
            )
        )
        for _ in range(steps_per_epoch - done):
            # loss sum and token count, on the device because NCCL reduces only device tensors
            start, stats = time.perf_counter(), torch.zeros(2, dtype=torch.float64, device=dev)
            for _ in range(o.grad_accum):
                batch = _to_device(next(batches), dev, float_dtype)
                loss = engine(**batch).loss
                engine.backward(loss)
                engine.step()
                stats += torch.stack([loss.detach().double(), _throughput_units(batch)])
            if world_size() > 1:
                torch.distributed.all_reduce(stats)
            step += 1
            mean_loss = stats[0].item() / (o.grad_accum * world_size())
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"loss is {mean_loss} at step {step} (epoch {epoch})")
            log.log(
                step,
                mean_loss,
                engine.lr_scheduler.get_last_lr(),
                stats[1].item() / (time.perf_counter() - start),
                epoch,
            )
            bar.update(1)
            progress = {
                "step": step,
                "epoch": step // steps_per_epoch,
                "samples_in_epoch": (step % steps_per_epoch) * samples_per_step,
                "samples_per_step": samples_per_step,
                "total_steps": total_steps,
                "frozen_abs_sum": frozen,
            }
            if step % config.save_steps == 0 or step == total_steps:
                save_checkpoint(engine, config, progress, processor, lora_base)
                last_saved = step
            if step == total_steps:
                break
    bar.close()
    log.close()
    final = os.path.join(config.output_dir, f"checkpoint-{last_saved}")
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
    return train(config, builders)
