"""Stage 0 on 1 and 2 ranks: step throughput with the class centres sharded (scaling efficiency), and the bytes each
rank sends per step with sharded centres against replicated ones at the paper's scale.

Throughput: the stage-0 recipe as users run it (`NUM_GPUS=N bash recipes/stage0_rice_pretrain.sh`) on the tiny world,
the same global batch on 1 and on 2 ranks (gloo on a CPU, one thread per rank), images/s over the steps after the
first two. Efficiency = images/s on 2 ranks / (2 x images/s on 1 rank).

Bytes per rank and step, ring collectives over N ranks (an all-reduce of B bytes sends 2 (N-1)/N B, an all-gather
of B bytes in total sends (N-1)/N B), M regions in the global batch, E the embedding width, P OCR positives:
- sharded (the kit): all-gather of the region embeddings (M E fp32) and labels (M P int64), all-reduce of their
  gradient (M E fp32), 8 all-reduces of one fp32 per region (the log-sum-exp of each term, shift and sum, in each
  loss), and the data-parallel all-reduce of the encoder and head gradients (fp32);
- replicated: no region traffic, but the gradients of every centre (K E + V E) join the data-parallel all-reduce.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "stage0_rice_pretrain.sh"


def ring_bytes(regions: int, embed_dim: int, positives: int, dense_params: int, centre_rows: int, ranks: int):
    """(sharded, replicated) bytes one rank sends per step, by the formulas of the module docstring."""
    share = (ranks - 1) / ranks
    regions_traffic = share * (regions * embed_dim * 4 + regions * positives * 8) + 2 * share * regions * embed_dim * 4
    regions_traffic += 8 * 2 * share * regions * 4
    sharded = regions_traffic + 2 * share * dense_params * 4
    replicated = 2 * share * (dense_params + centre_rows * embed_dim) * 4
    return sharded, replicated


def _images_per_s(ranks: int, args: argparse.Namespace, out: Path) -> float:
    world = out / "world"
    run = out / f"ranks{ranks}"
    overrides = [
        f"output_dir={run}",
        f"data.tiny_world={world}",
        f"data.tiny_world_images={args.images}",
        f"data.train_files={world / 'regions_train.jsonl'}",
        f"model.vision={args.vision}",
        f"optim.batch_size={args.global_batch // ranks}",
        f"optim.max_steps={args.steps}",
        f"save_steps={args.steps}",
        "resume=null",
    ]
    env = {**os.environ, "NUM_GPUS": str(ranks), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(RECIPE), *overrides], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stdout[-3000:] + done.stderr[-3000:])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records[2:]]  # images/s for stage 0; the first steps warm up
    return sum(rates) / len(rates)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vision", default="rice-vit-tiny-world", help="encoder preset of the throughput runs")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--no-throughput", action="store_true", help="print the communication table only")
    args = parser.parse_args(argv)
    result: dict = {}
    if not args.no_throughput:
        with tempfile.TemporaryDirectory() as tmp:
            rates = {ranks: _images_per_s(ranks, args, Path(tmp)) for ranks in (1, 2)}
        efficiency = rates[2] / (2 * rates[1])
        print(f"stage-0 steps, global batch {args.global_batch}, {args.vision}, one thread per rank:")
        for ranks, rate in rates.items():
            print(f"  {ranks} rank(s): {rate:.1f} images/s")
        print(f"  scaling efficiency on 2 ranks: {efficiency:.0%}")
        result |= {"images_per_s": rates, "efficiency": efficiency}
    # The paper's scale: ViT-L/14 (304M) + region head, K = 1M object centres, Qwen2.5's vocabulary as OCR classes,
    # E = 1024, 32K images x 10 regions a step, 10 OCR positives.
    print("bytes each rank sends per step (K = 1M, V = 151,666, E = 1024, 320K regions, ViT-L + head = 308M):")
    for ranks in (2, 8, 64):
        sharded, replicated = ring_bytes(320_000, 1024, 10, 308_000_000, 1_151_666, ranks)
        print(
            f"  {ranks:>2} ranks: sharded {sharded / 1e9:.2f} GB, replicated {replicated / 1e9:.2f} GB "
            f"({replicated / sharded:.1f}x)"
        )
        result[f"bytes_{ranks}"] = (sharded, replicated)
    return result


if __name__ == "__main__":
    main()
