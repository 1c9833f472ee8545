"""Training metrics: the console (rank 0, every `logging_steps`), TensorBoard and `metrics.jsonl` in the run folder."""

from __future__ import annotations

import json
import os

from tqdm.auto import tqdm

from .engine import rank


class MetricsLog:
    """Writes one record per optimizer step; on resume, records past the checkpoint's step are dropped (replayed)."""

    def __init__(self, output_dir: str, logging_steps: int, group_names: list[str], start_step: int):
        self.logging_steps, self.names, self.writer, self.file = logging_steps, group_names, None, None
        if rank() == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=start_step + 1)
            path = os.path.join(output_dir, "metrics.jsonl")
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
        if step % self.logging_steps == 0:
            lr_text = " ".join(f"{n}={v:.2e}" for n, v in record["lr"].items())
            tqdm.write(f"step {step} loss {loss:.4f} lr {lr_text} tok/s {tokens_per_s:.0f}")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.file.close()
