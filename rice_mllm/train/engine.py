"""Training engines with DeepSpeed's engine API: DeepSpeed itself (ZeRO 0-3) or a plain-torch stand-in (one process).

The kit always builds the optimizer (AdamW over per-part groups) and the scheduler itself: a DeepSpeed JSON with an
`optimizer` or `scheduler` block would silently replace the per-part learning rates, so it is rejected.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn
from transformers import get_scheduler

from .config import TrainConfig

logger = logging.getLogger(__name__)


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    if dist.is_initialized():
        dist.barrier()


def device() -> torch.device:
    """This rank's GPU (LOCAL_RANK) when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed() -> None:
    """Start the process group DeepSpeed needs: env:// under a launcher, else a one-process group on a free port."""
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not torch.cuda.is_available():
        # the shm all-reduce op JIT-compiles for ~50 s on first use (DESIGN.md section 7); gloo needs none
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    else:
        torch.cuda.set_device(device())
    if "RANK" not in os.environ:
        # plain `python`: a one-process group; DeepSpeed itself reads LOCAL_RANK from the environment
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for key, value in {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }.items():
            os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend=backend)


def load_deepspeed_config(config: TrainConfig) -> dict:
    """Read the DeepSpeed JSON and fill its "auto" values from the training config.

    Raises:
        ValueError: the JSON has an `optimizer` or `scheduler` block, or an "auto" the kit does not fill.
    """
    with open(config.deepspeed) as f:
        ds = json.load(f)
    for block in ("optimizer", "scheduler"):
        if block in ds:
            raise ValueError(
                f"{config.deepspeed}: remove the {block!r} block; it would override the per-part learning rates of "
                f"stage {config.stage!r}. The kit builds AdamW and the {config.optim.scheduler} schedule itself."
            )
    o = config.optim
    filled = {
        "train_micro_batch_size_per_gpu": o.batch_size,
        "gradient_accumulation_steps": o.grad_accum,
        "train_batch_size": o.batch_size * o.grad_accum * world_size(),
        "gradient_clipping": o.max_grad_norm,
    }
    for key, value in filled.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise ValueError(f'{config.deepspeed}: {key}={ds[key]} disagrees with the config ({value}); use "auto"')
        ds[key] = value
    # the bf16 block says "auto": optim.bf16 decides. fp16 is not offered (loss scaling, which the torch engine lacks).
    if ds.get("fp16", {}).get("enabled") not in (None, False):
        raise ValueError(f"{config.deepspeed}: fp16 is not supported; remove the fp16 block and set optim.bf16=true")
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": o.bf16}

    def find_auto(node: object, path: str) -> None:
        if node == "auto":
            raise ValueError(f'{config.deepspeed}: {path} is "auto" but the kit fills only {sorted(filled)}')
        if isinstance(node, dict):
            for k, v in node.items():
                find_auto(v, f"{path}.{k}" if path else k)

    find_auto(ds, "")
    return ds


class TorchEngine:
    """One-process plain-torch training with the subset of DeepSpeed's engine API the trainer uses."""

    def __init__(self, model: nn.Module, optimizer, lr_scheduler, grad_accum: int, max_grad_norm: float, bf16: bool):
        self.module, self.optimizer, self.lr_scheduler = model, optimizer, lr_scheduler
        self.grad_accum, self.max_grad_norm, self.bf16 = grad_accum, max_grad_norm, bf16
        self.micro_steps = 0

    def __call__(self, **batch):
        dev = device()
        ctx = torch.autocast(dev.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        with ctx:
            return self.module(**batch)

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.grad_accum == 0

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        if self.is_gradient_accumulation_boundary():
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            if self.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.micro_steps += 1

    def save_checkpoint(self, save_dir: str, tag: str, **_) -> None:
        """Trainable parameters, optimizer and scheduler (frozen weights come from the model build): tensors and
        plain values only, so `load_checkpoint` reads them with `weights_only=True` (no pickled objects)."""
        trainable = {n: p.detach().clone() for n, p in self.module.named_parameters() if p.requires_grad}
        state = {
            "trainable": trainable,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "micro_steps": self.micro_steps,
        }
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        torch.save(state, os.path.join(save_dir, tag, "engine_state.pt"))

    def load_checkpoint(self, load_dir: str, tag: str, **_) -> None:
        state = torch.load(os.path.join(load_dir, tag, "engine_state.pt"), weights_only=True)
        params = dict(self.module.named_parameters())
        trainable = {n for n, p in params.items() if p.requires_grad}
        if set(state["trainable"]) != trainable:
            diff = sorted(set(state["trainable"]) ^ trainable)[:5]
            raise KeyError(f"{load_dir}: trainable parameters differ from the checkpoint's (e.g. {diff})")
        with torch.no_grad():
            for n, t in state["trainable"].items():
                params[n].copy_(t)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.micro_steps = state["micro_steps"]


def adamw(groups: list[dict]) -> torch.optim.AdamW:
    """The kit's optimizer, for the engine's parameters and for sharded ones alike."""
    # torch AdamW, not DeepSpeed's cpu_adam/fused_adam: those JIT-compile for ~90 s and add nothing on CPU
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)


def lr_schedule(optimizer, config: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """`optim.scheduler` with `optim.warmup_ratio` of the steps warming up."""
    warmup = int(round(config.optim.warmup_ratio * total_steps))
    return get_scheduler(config.optim.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def build_engine(
    model: nn.Module, groups: list[dict], config: TrainConfig, total_steps: int, load_universal: bool = False
):
    """AdamW over `groups` with the configured schedule, wrapped by DeepSpeed or by TorchEngine.

    Args:
        load_universal: the engine will load a DeepSpeed universal checkpoint (a resume at another world size).

    Returns:
        An engine: `engine(**batch)`, `.backward(loss)`, `.step()`, `.save_checkpoint`, `.load_checkpoint`,
        `.module`, `.lr_scheduler` (one lr per group, in `groups` order).
    """
    o = config.optim

    def schedule(optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return lr_schedule(optimizer, config, total_steps)

    optimizer = adamw(groups)
    if config.deepspeed is None:
        if world_size() > 1:
            raise ValueError(f"{world_size()} ranks but deepspeed is null: set deepspeed to a ZeRO JSON")
        model.to(device())
        return TorchEngine(model, optimizer, schedule(optimizer), o.grad_accum, o.max_grad_norm, o.bf16)
    import deepspeed

    # a callable scheduler is built by DeepSpeed on its wrapped optimizer and stepped at each boundary
    ds_config = load_deepspeed_config(config)
    if load_universal:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config)
    return engine


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The complete model state dict on rank 0 (None elsewhere); under ZeRO-3 every rank must call it."""
    if getattr(engine, "zero_optimization_partition_weights", lambda: False)():
        return engine._zero3_consolidated_16bit_state_dict()
    if rank() != 0:
        return None
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
