"""Stage-0 loss step at K = 1M classes: PartialFC sampled negatives (rho = 0.1) vs full softmax (rho = 1).

Times forward + backward of ClusterMarginLoss and reports peak memory: CUDA allocator peak on GPU, peak RSS growth
on CPU (each setting runs in a fresh process so the peaks do not mix). Prints the time and memory ratios.
"""

import argparse
import multiprocessing as mp
import resource
import time

import torch

from rice_mllm.pretrain.losses import ClusterMarginLoss


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _run(args: argparse.Namespace, ratio: float, queue: mp.Queue) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    loss_fn = ClusterMarginLoss(args.classes, args.dim, sample_ratio=ratio).to(device)
    embeddings = torch.randn(args.regions, args.dim, device=device, requires_grad=True)
    labels = torch.randint(0, args.classes, (args.regions,), device=device)

    def step() -> None:
        loss_fn.zero_grad(set_to_none=True)
        embeddings.grad = None
        loss_fn(embeddings, labels).backward()

    # Baseline before any step (setup made no temporaries): the peak then includes the dense centre gradient and
    # the [M, S] logits.
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _peak_rss_bytes()
    step()  # warm-up: allocator, kernels
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else _peak_rss_bytes() - base
    queue.put((sorted(times)[len(times) // 2], peak))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--classes", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--regions", type=int, default=512, help="regions per step per rank (e.g. 51 images x 10)")
    parser.add_argument("--ratio", type=float, default=0.1, help="sampled rho to compare with rho = 1")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    context = mp.get_context("spawn")
    results = {}
    for ratio in (args.ratio, 1.0):
        queue = context.Queue()
        process = context.Process(target=_run, args=(args, ratio, queue))
        process.start()
        results[ratio] = queue.get()
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"benchmark at rho={ratio} exited with {process.exitcode}")
        seconds, peak = results[ratio]
        print(f"rho={ratio:<5} step {seconds * 1e3:9.1f} ms   peak extra memory {peak / 2**20:9.1f} MiB")
    (fast, fast_mem), (full, full_mem) = results[args.ratio], results[1.0]
    print(
        f"K={args.classes} E={args.dim} M={args.regions} on {args.device}: rho={args.ratio} is {full / fast:.1f}x "
        f"faster, {full_mem / max(fast_mem, 1):.1f}x less peak extra memory than rho=1"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
