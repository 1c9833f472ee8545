"""`python -m rice_mllm.export`: a kit checkpoint to transformers, and back; a LLaVA-NeXT-repo checkpoint to the kit."""

from __future__ import annotations

import argparse
import logging

from .llava_repo import import_llava_repo
from .transformers_llava import TARGETS, export_checkpoint, import_checkpoint

USAGE = """examples:
  python -m rice_mllm.export --checkpoint outputs/stage2_instruct --out hf/        # LLaVA-NeXT, or OneVision if needed
  python -m rice_mllm.export --checkpoint DIR --out hf/ --target llava_onevision   # force a target
  python -m rice_mllm.export --from-transformers hf/ --out kit/                    # and back
  python -m rice_mllm.export --from-llava-repo llava_qwen_ckpt/ --out kit/         # LLaVA-NeXT's training repo
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rice_mllm.export",
        description=__doc__.splitlines()[0].strip('"`'),
        epilog=USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="kit model, checkpoint or run folder to export to transformers")
    source.add_argument("--from-transformers", help="transformers LLaVA-NeXT or OneVision folder to import")
    source.add_argument("--from-llava-repo", help="LLaVA-NeXT-repo checkpoint (llava_qwen, MLCD/RICE tower) to import")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--target",
        choices=("auto", *TARGETS),
        default="auto",
        help="with --checkpoint: auto writes LLaVA-NeXT unless the model has a token budget (max_grid_tiles) or "
        "base-tile multi-image samples (multi_image_tiling=base), which OneVision reproduces",
    )
    parser.add_argument(
        "--vision-tower", help="with --from-llava-repo: the tower's folder, when mm_vision_tower is not reachable here"
    )
    args = parser.parse_args(argv)
    if args.vision_tower and not args.from_llava_repo:
        parser.error("--vision-tower goes with --from-llava-repo")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.checkpoint:
        out = export_checkpoint(args.checkpoint, args.out, args.target)
    elif args.from_transformers:
        out = import_checkpoint(args.from_transformers, args.out)
    else:
        out = import_llava_repo(args.from_llava_repo, args.out, args.vision_tower)
    print(f"wrote {out}")
    return 0
