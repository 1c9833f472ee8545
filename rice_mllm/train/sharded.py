"""Parameters whose rows differ per rank (stage 0's class centres): out of the engine, an AdamW of their own, saved
per rank and re-sharded on load.

A data-parallel engine would average their gradients over ranks (mixing rows that are different classes) or, under
ZeRO-3, partition them again, so they leave the model's parameter registry before the engine is built: the model
still uses them in forward, DeepSpeed never sees them. Their rows are the contiguous shards of `losses.shard_range`,
so a checkpoint written on N ranks loads on any other count. Like PartialFC's reference trainer, the centres' own
gradients are not clipped (only the engine's parameters are).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..pretrain.losses import shard_range
from .config import TrainConfig
from .engine import adamw, device, lr_schedule, rank, world_size

BYTES_PER_ELEMENT = 16  # fp32 weight, gradient and two AdamW moments


def centre_memory_bytes(rows: list[int], embed_dim: int, world: int) -> int:
    """Bytes the largest rank holds for matrices of `rows` x `embed_dim` sharded over `world` ranks."""
    return sum(-(-r // world) for r in rows) * embed_dim * BYTES_PER_ELEMENT


def _size(count: int) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def _available_bytes() -> tuple[int, str]:
    if torch.cuda.is_available():
        return torch.cuda.mem_get_info(device())[0], f"free on {torch.cuda.get_device_name(device())}"
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "available RAM"


def check_centre_memory(names: list[str], rows: list[int], embed_dim: int, world: int) -> None:
    """Print each rank's memory for the sharded centres (`names`: e.g. "object", "OCR") and their optimizer; refuse
    a plan the device cannot hold.

    Raises:
        MemoryError: with the figures, before anything is allocated.
    """
    need = centre_memory_bytes(rows, embed_dim, world)
    shapes = ", ".join(f"{name} {count:,} x {embed_dim}" for name, count in zip(names, rows, strict=True))
    have, where = _available_bytes()
    line = (
        f"class centres: {shapes} over {world} rank(s): {_size(need)} per rank "
        f"(fp32 weights, gradients, AdamW moments); {_size(have)} {where}"
    )
    if rank() == 0:
        tqdm.write(line)
    if need > have:
        raise MemoryError(f"{line}: does not fit; use more ranks or fewer clusters (pretrain.num_clusters)")


def _take_parameter(model: nn.Module, name: str) -> nn.Parameter:
    """Move a parameter out of the module's registry, leaving it an attribute forward still reads."""
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    parameter = owner._parameters.pop(leaf)
    owner.__dict__[leaf] = parameter
    return parameter


class ShardedParameters:
    """The sharded parameters of a model with their own AdamW and schedule (the stage's lrs and weight decay).

    Args:
        model: the model; `model.sharded_parameter_names()` are taken out of its registry.
        groups: the stage's optimizer groups; those holding sharded parameters move here and are removed in place.
    """

    def __init__(self, model: nn.Module, groups: list[dict], config: TrainConfig, total_steps: int):
        names = model.sharded_parameter_names()
        self.parameters = {name: _take_parameter(model, name) for name in names}
        ids = {id(p) for p in self.parameters.values()}
        mine = [g for g in groups if any(id(p) in ids for p in g["params"])]
        if any(id(p) not in ids for g in mine for p in g["params"]):
            raise ValueError(f"a parameter group mixes sharded parameters {names} with replicated ones")
        groups[:] = [g for g in groups if g not in mine]
        for parameter in self.parameters.values():
            parameter.data = parameter.data.to(device())
        self.group_names = [g["name"] for g in mine]
        self.optimizer = adamw(mine)
        self.scheduler = lr_schedule(self.optimizer, config, total_steps)
        self.rows = self._global_rows()

    def _global_rows(self) -> dict[str, int]:
        local = torch.tensor([p.shape[0] for p in self.parameters.values()], dtype=torch.int64, device=device())
        if world_size() > 1:
            dist.all_reduce(local)
        return dict(zip(self.parameters, local.tolist(), strict=True))

    def step(self) -> None:
        """One optimizer step, at the engine's accumulation boundary."""
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def last_lrs(self) -> list[float]:
        return self.scheduler.get_last_lr()

    def save(self, state_dir: Path) -> None:
        """This rank's rows, their AdamW moments, and the step and schedule, into `sharded_rank{r}.safetensors`."""
        tensors, layout = {}, {}
        for name, parameter in self.parameters.items():
            state = self.optimizer.state.get(parameter, {})
            tensors[name] = parameter.detach().cpu().contiguous()
            for moment in ("exp_avg", "exp_avg_sq"):
                if moment in state:
                    tensors[f"{name}.{moment}"] = state[moment].cpu().contiguous()
            layout[name] = {
                "rows": shard_range(self.rows[name], rank(), world_size()),
                "step": float(state.get("step", 0)),
            }
        metadata = {"layout": json.dumps(layout), "scheduler": json.dumps(self.scheduler.state_dict())}
        save_file(tensors, str(state_dir / f"sharded_rank{rank()}.safetensors"), metadata=metadata)

    def load(self, state_dir: Path) -> None:
        """Restore this rank's rows from the files of every saving rank, whatever their count (re-sharding)."""
        files = sorted(state_dir.glob("sharded_rank*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{state_dir}: no sharded_rank*.safetensors (the class centres of this run)")
        handles = [safe_open(str(f), framework="pt") for f in files]
        scheduler = json.loads(handles[0].metadata()["scheduler"])
        for name, parameter in self.parameters.items():
            start, end = shard_range(self.rows[name], rank(), world_size())
            pieces = {key: _rows(handles, name, key, start, end) for key in ("", ".exp_avg", ".exp_avg_sq")}
            with torch.no_grad():
                parameter.copy_(pieces[""])
            step = json.loads(handles[0].metadata()["layout"])[name]["step"]
            if pieces[".exp_avg"] is not None:
                self.optimizer.state[parameter] = {
                    "step": torch.tensor(step),
                    "exp_avg": pieces[".exp_avg"].to(parameter.device),
                    "exp_avg_sq": pieces[".exp_avg_sq"].to(parameter.device),
                }
        self.scheduler.load_state_dict(scheduler)
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
            group["lr"] = lr  # the schedule's state holds the step; the optimizer's groups hold the lr it set


def _rows(handles: list, name: str, suffix: str, start: int, end: int) -> torch.Tensor | None:
    """Rows [start, end) of tensor `name + suffix`, assembled from the saving ranks' files (None if none has it)."""
    parts = []
    for handle in handles:
        saved_start, saved_end = json.loads(handle.metadata()["layout"])[name]["rows"]
        lo, hi = max(start, saved_start), min(end, saved_end)
        if lo >= hi:
            continue
        if name + suffix not in handle.keys():
            return None
        parts.append(handle.get_slice(name + suffix)[lo - saved_start : hi - saved_start])
    covered = sum(part.shape[0] for part in parts)
    if covered != end - start:
        raise ValueError(f"{name}: the saved shards cover {covered} of rows [{start}, {end})")
    return torch.cat(parts)
