"""Stage-0 labelling at the paper's scale: 1M region features of width 1024 into 1e5 centres with the kit's two-level
faiss k-means, then the kit's torch k-means vs faiss flat (and two-level) k-means at a size all of them can do.

Features are random centres plus noise (k-means has structure to find). Each run is a fresh process, so peak RSS does
not mix; it prints wall and CPU time, peak RSS, the mean squared distance to the assigned centre, and the share of
labels that are the exact nearest centre (on a sample: the two-level assignment searches only `nprobe` coarse cells).
"""

import argparse
import multiprocessing as mp
import resource
import time

import numpy as np
import torch

from rice_mllm.pretrain.kmeans import NPROBE, assign_clusters, cluster_features


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _features(regions: int, dim: int, groups: int, seed: int) -> np.ndarray:
    """[regions, dim] float32: `groups` N(0, 1) centres plus N(0, 1) noise, written in chunks (no full-size temps)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((groups, dim), dtype=np.float32)
    out = np.empty((regions, dim), dtype=np.float32)
    for start in range(0, regions, 65536):
        rows = out[start : start + 65536]
        rows[:] = centres[rng.integers(0, groups, len(rows))] + rng.standard_normal(rows.shape, dtype=np.float32)
    return out


def _quality(features: torch.Tensor, centres: torch.Tensor, labels: torch.Tensor, sample: int) -> dict[str, float]:
    """Mean squared distance to the assigned centre; on `sample` rows, the share of labels that are the exact nearest
    centre and how much farther (squared distance, relative) the assigned centres are than the exact ones."""
    chunks = zip(features.split(65536), labels.split(65536), strict=True)
    squared = sum(float(((x - centres[y]) ** 2).sum()) for x, y in chunks)
    rows = torch.randperm(len(features), generator=torch.Generator().manual_seed(0))[:sample]
    exact = assign_clusters(features[rows], centres)  # [sample], brute force
    assigned, nearest = (float(((features[rows] - centres[y]) ** 2).sum()) for y in (labels[rows], exact))
    return dict(
        mse=squared / len(features),
        exact_share=float((exact == labels[rows]).float().mean()),
        excess=assigned / nearest - 1,
    )


def _run(spec: dict, args: argparse.Namespace, queue: mp.Queue) -> None:
    import faiss  # the child's own thread settings

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    features = torch.from_numpy(_features(spec["regions"], spec["dim"], spec["clusters"], args.seed))
    base = _peak_rss_bytes()
    wall, cpu = time.perf_counter(), time.process_time()
    centres, labels = cluster_features(
        features,
        spec["clusters"],
        spec["backend"],
        iters=args.iters,
        seed=args.seed,
        hierarchical_from=spec["hierarchical_from"],
        nprobe=args.nprobe,
    )
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = _peak_rss_bytes()
    queue.put(dict(wall_s=wall, cpu_s=cpu, peak_gib=peak / 2**30, extra_gib=(peak - base) / 2**30))
    queue.put(_quality(features, centres, labels, args.sample))


def _specs(args: argparse.Namespace) -> list[tuple[str, dict]]:
    big = dict(regions=args.regions, dim=args.dim, clusters=args.clusters)
    small = dict(regions=args.small_regions, dim=args.small_dim, clusters=args.small_clusters)
    never = 2**62  # a hierarchical_from no K reaches: the flat path
    return [
        ("faiss two-level", dict(big, backend="faiss", hierarchical_from=args.clusters)),
        ("torch (kit)", dict(small, backend="torch", hierarchical_from=never)),
        ("faiss flat", dict(small, backend="faiss", hierarchical_from=never)),
        ("faiss two-level", dict(small, backend="faiss", hierarchical_from=args.small_clusters)),
    ]


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--regions", type=int, default=1_000_000, help="M of the paper-scale run")
    parser.add_argument("--dim", type=int, default=1024, help="E (CLIP ViT-L/14 hidden size)")
    parser.add_argument("--clusters", type=int, default=100_000, help="K (two-level)")
    parser.add_argument("--small-regions", type=int, default=100_000, help="M of the side-by-side runs")
    parser.add_argument("--small-dim", type=int, default=256)
    parser.add_argument("--small-clusters", type=int, default=1000)
    parser.add_argument("--iters", type=int, default=25)
    parser.add_argument("--nprobe", type=int, default=NPROBE, help="coarse cells searched per region (two-level)")
    parser.add_argument("--sample", type=int, default=2000, help="rows checked against exact nearest-centre search")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    context = mp.get_context("spawn")
    results = {}
    for name, spec in _specs(args):
        queue = context.Queue()
        process = context.Process(target=_run, args=(spec, args, queue))
        process.start()
        process.join()  # before reading: a child that died never writes (its two small dicts fit the pipe)
        if process.exitcode != 0:
            raise RuntimeError(f"benchmark {name!r} exited with {process.exitcode}")
        result = {**queue.get(), **queue.get()}
        results[f"{name} {spec['regions']}x{spec['dim']}->{spec['clusters']}"] = result
        print(
            f"{name:<16} {spec['regions']:>9} x {spec['dim']:<5} -> K={spec['clusters']:<7} "
            f"wall {result['wall_s']:8.1f} s  CPU {result['cpu_s']:8.1f} s  peak RSS {result['peak_gib']:6.2f} GiB "
            f"(+{result['extra_gib']:.2f} over the features)  mse {result['mse']:.4g}  "
            f"exact nearest {100 * result['exact_share']:.1f}% (+{100 * result['excess']:.2f}% squared distance)",
            flush=True,
        )
    return results


if __name__ == "__main__":
    main()
