"""Anyres preprocessing throughput: the kit's RiceImageProcessor vs transformers' LlavaNextImageProcessor.

Same images, tile size and pinpoints; one image per call (as a data-loader worker does); best of N repeats.
transformers runs its PIL backend here (torchvision is not installed), single-threaded: torch is pinned
to --threads (default 1) so the comparison is per core. Prints images/s and the ratio (goal >= 3x).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from bench_common import run_with_threads
from PIL import Image
from transformers import LlavaNextImageProcessorPil

from rice_mllm.mllm.anyres import AnyresGeometry, make_grid_pinpoints, num_tiles
from rice_mllm.mllm.image_processing import RiceImageProcessor


def make_images(count: int, seed: int) -> list[Image.Image]:
    """Photo-sized RGB images (sides 200-1600 px, aspect up to 1:4) with smooth content plus noise."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        height, width = (int(side) for side in rng.integers(200, 1600, size=2))
        if max(height, width) > 4 * min(height, width):
            width = min(width, 4 * height)
            height = min(height, 4 * width)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        base = np.stack([xx / width, yy / height, (xx + yy) / (width + height)], axis=-1) * 200
        pixels = base + rng.normal(0, 20, size=(height, width, 3))
        images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return images


def best_time(function, images: list[Image.Image], repeats: int) -> float:
    """Fastest of `repeats` passes over all images, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for image in images:
            function(image)
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark, print a table, return {name: images per second} and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tile-size", type=int, default=336)
    parser.add_argument("--patch-size", type=int, default=14)
    parser.add_argument("--max-tiles", type=int, default=4)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the kit (transformers/PIL: 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return run_with_threads(args.threads, _run, args)


def _run(args: argparse.Namespace) -> dict[str, float]:

    tile = args.tile_size
    pinpoints = make_grid_pinpoints(tile, args.max_tiles)
    geometry = AnyresGeometry(tile, args.patch_size, pinpoints)
    reference = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints
    )
    kit = {name: RiceImageProcessor(geometry, resample=name) for name in ("torch", "pil")}
    images = make_images(args.images, args.seed)
    tiles = sum(num_tiles((image.height, image.width), geometry) for image in images)

    # Warm-up and a correctness check on the first image before timing.
    expected = reference([images[0]], return_tensors="pt")["pixel_values"][0]
    for name, processor in kit.items():
        got = processor([images[0]])["pixel_values"]
        print(f"max |kit[{name}] - transformers| on image 0: {(got - expected[: len(got)]).abs().max():.2e}")

    seconds = {
        "transformers LlavaNextImageProcessor(PIL)": best_time(
            lambda im: reference([im], return_tensors="pt"), images, args.repeats
        )
    }
    for name, processor in kit.items():
        seconds[f"rice_mllm RiceImageProcessor(resample={name})"] = best_time(
            lambda im, p=processor: p([im]), images, args.repeats
        )

    baseline = next(iter(seconds.values()))
    setting = f"grids up to {args.max_tiles} tiles, torch threads {args.threads}"
    print(f"\n{len(images)} images, {tiles} tiles of {tile}px, {setting}")
    result = {}
    for name, value in seconds.items():
        result[name] = len(images) / value
        print(f"{name:48s} {len(images) / value:8.1f} images/s   ratio vs transformers {baseline / value:5.2f}x")
    return result


if __name__ == "__main__":
    main()
