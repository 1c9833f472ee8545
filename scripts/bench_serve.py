"""Serving throughput: concurrent clients against `rice_mllm.serve` batching requests (`--max-batch 16`) and serving
them one at a time (`--max-batch 1`): same model, same requests, same replies (checked). Prints requests/s and p50/p95
latency of each and the throughput ratio.

Wall time, not CPU time as the other benchmarks: the figure is requests answered per second with clients waiting.
Each of --clients threads sends --requests non-streamed chat requests one after another over HTTP to a server in this
process: the first user turn of a bench_common.make_chats chat (25% text-only, 60% one image, 15% two), asking for
--max-tokens new tokens. Models (random weights): `tiny-world` has the architecture `python -m rice_mllm.tiny_world`
trains, the model `python -m rice_mllm.serve` serves by default (one 96 px tile per image); `mixed` is
bench_common's CPU-sized stand-in with 2x2+1 anyres tiles of 112 px, whose prompts range from 20 to 700 tokens.

    python scripts/bench_serve.py                   # ~20 s on 2 cores; --quick for a smoke run
    python scripts/bench_serve.py --model mixed     # ~30 s
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import torch
from bench_common import build_kit, make_chats

from rice_mllm.mllm.assembly import TINY_TOKENIZER, assemble_model, build_processor
from rice_mllm.presets import load_preset
from rice_mllm.serve.batching import MAX_PADDING, WAIT_S
from rice_mllm.serve.images import image_data_url
from rice_mllm.tiny_world import ENCODER, PLAN

REPO_ROOT = Path(__file__).resolve().parents[1]
MODES = {"one at a time": 1, "batched": 16}


def _request(messages: list[dict], images: list, max_tokens: int) -> bytes:
    parts = [{"type": "image_url", "image_url": {"url": image_data_url(image)}} for image in images]
    text = messages[0]["content"].replace("<image>\n", "")
    content = [*parts, {"type": "text", "text": text}]
    body = {"model": "bench", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    return json.dumps(body).encode()


def _post(url: str, body: bytes) -> tuple[float, dict]:
    start = time.perf_counter()
    request = urllib.request.Request(f"{url}/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        reply = json.loads(response.read())
    return time.perf_counter() - start, reply


def _load(url: str, bodies: list[list[bytes]]) -> tuple[float, list[float], list[list[str]]]:
    """Every client thread sends its bodies in turn. Returns (wall seconds, latencies, replies per client)."""
    latencies: list[float] = []
    replies: list[list[str]] = [[] for _ in bodies]

    def client(index: int) -> None:
        for body in bodies[index]:
            seconds, reply = _post(url, body)
            latencies.append(seconds)
            replies[index].append(reply["choices"][0]["message"]["content"])

    threads = [threading.Thread(target=client, args=(index,)) for index in range(len(bodies))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, latencies, replies


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Run the benchmark, print the table and ratio, return {mode: {"requests_per_s", "p50_s", "p95_s"}}."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 4 clients, 1 request each: a smoke run")
    parser.add_argument("--model", choices=["tiny-world", "mixed"], default="tiny-world")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=8, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads (the other core: HTTP)")
    parser.add_argument("--batch-wait-ms", type=float, default=WAIT_S * 1000, help="the server's option")
    parser.add_argument("--max-padding", type=float, default=MAX_PADDING, help="the server's option")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.requests, args.max_tokens = 4, 1, 4
    return _run(args)


def _tiny_world_kit(seed: int):
    """A random model of the tiny world's architecture (its plan's encoder and LLM presets), one tile per image."""
    encoder = load_preset(ENCODER)
    processor = build_processor(
        TINY_TOKENIZER, encoder["image_size"], encoder["patch_size"], max_tiles=1, multi_image_tiling="base"
    )
    torch.manual_seed(seed)
    return assemble_model(ENCODER, PLAN["stage1"][1]["model.llm"], processor), processor


def _start_server(directory: Path, max_batch: int, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    """`python -m rice_mllm.serve` in its own process (clients in this one do not compete for its GIL)."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    argv = [sys.executable, "-m", "rice_mllm.serve", "--model", str(directory), "--served-model-name", "bench"]
    argv += ["--port", str(port), "--max-batch", str(max_batch), "--batch-wait-ms", str(args.batch_wait_ms)]
    argv += ["--max-padding", str(args.max_padding)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1")
    server = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            _health(url)
            return server, url
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited: {server.stderr.read()}") from None
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("the server did not start within 60 s")


def _health(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
        return json.loads(response.read())


def _run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    if args.quick:
        model, processor = build_kit("quick", args.seed)
    elif args.model == "tiny-world":
        model, processor = _tiny_world_kit(args.seed)
    else:
        model, processor = build_kit("default", args.seed)
    chats = make_chats(args.clients * args.requests, args.seed + 1, max_side=400)
    bodies = [_request(messages, images, args.max_tokens) for messages, images in chats]
    per_client = [bodies[index :: args.clients] for index in range(args.clients)]
    results, replies = {}, {}
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        processor.save_pretrained(directory)
        for mode, max_batch in MODES.items():
            server, url = _start_server(Path(directory), max_batch, args)
            try:
                _post(url, bodies[0])  # warm-up
                before = Counter(_health(url)["batch_sizes"])
                seconds, latencies, replies[mode] = _load(url, per_client)
                sizes = Counter(_health(url)["batch_sizes"]) - before
            finally:
                server.terminate()
                server.wait(timeout=60)
            results[mode] = {
                "requests_per_s": len(bodies) / seconds,
                "p50_s": statistics.median(latencies),
                "p95_s": statistics.quantiles(latencies, n=20)[-1] if len(latencies) > 1 else latencies[0],
                "mean_batch": len(bodies) / sum(sizes.values()),
                "batch_sizes": dict(sorted((int(size), count) for size, count in sizes.items())),
            }
    print(
        f"model {'quick' if args.quick else args.model}: {args.clients} clients x {args.requests} requests, "
        f"{args.max_tokens} new tokens each; server: torch threads {args.threads}, --batch-wait-ms "
        f"{args.batch_wait_ms:g}, --max-padding {args.max_padding:g}"
    )
    print(f"{'mode':<14} {'requests/s':>10} {'p50 s':>8} {'p95 s':>8} {'mean batch':>10}  generates by batch size")
    for mode, figures in results.items():
        print(
            f"{mode:<14} {figures['requests_per_s']:>10.2f} {figures['p50_s']:>8.2f} {figures['p95_s']:>8.2f} "
            f"{figures['mean_batch']:>10.1f}  {figures['batch_sizes']}"
        )
    ratio = results["batched"]["requests_per_s"] / results["one at a time"]["requests_per_s"]
    different = sum(
        a != b for one, other in zip(*replies.values(), strict=True) for a, b in zip(one, other, strict=True)
    )
    print(f"throughput ratio batched / one at a time: {ratio:.2f}x; replies that differ between modes: {different}")
    return results


if __name__ == "__main__":
    main()
