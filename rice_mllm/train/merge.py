"""Merge a LoRA checkpoint into its base: `python -m rice_mllm.train.merge CHECKPOINT OUTPUT_DIR`.

The merged plain model must reproduce the adapter model's logits (checked before anything is written).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from torch import nn

from ..checkpoint_layout import (
    ADAPTER_FILES,
    BASE_FILE,
    NON_LORA_FILE,
    RUN_CONFIG_FILE,
    adapter_base_dir,
    attach_adapter,
    is_adapter,
    resolve_model_dir,
)
from .builders import DEFAULT_BUILDERS, Builders
from .config import load_config
from .trainer import set_seed


def _parity_batch(model: nn.Module, seed: int = 0) -> dict:
    """Text-only random ids (never the image token) for a logits comparison: [2, 16]."""
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(seed))
    image_token = getattr(model.config, "image_token_id", None)
    if image_token is not None:
        ids[ids == image_token] = 0
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def merge(checkpoint: str, output_dir: str, builders: Builders = DEFAULT_BUILDERS, rtol: float = 1e-4) -> float:
    """Load base + adapter + trained non-LoRA parts, merge, check logits, save a plain model dir.

    Args:
        checkpoint: a LoRA checkpoint dir, its `model/` dir, or a run dir (last checkpoint).
        output_dir: where the merged HF model dir (weights, config, processor files) goes.
        builders: `builders.model` rebuilds the base from the checkpoint's config with `init_from` = base dir.
        rtol: allowed max |logit difference| relative to max(1, max |logit|).

    Returns:
        The max absolute logit difference between the adapter model and the merged model.

    Raises:
        ValueError: the merged logits differ by more than the tolerance (nothing is written).
    """
    model_dir = resolve_model_dir(checkpoint)
    if not is_adapter(model_dir):
        raise ValueError(f"{checkpoint}: {model_dir} holds full weights, not a LoRA adapter: nothing to merge")
    config = load_config(model_dir.parent / RUN_CONFIG_FILE)
    config.model.init_from = str(adapter_base_dir(model_dir))
    set_seed(config.optim.seed)
    base = builders.model(config, builders.inputs(config))
    peft_model = attach_adapter(base, model_dir).eval()
    batch = _parity_batch(peft_model.get_base_model())
    with torch.no_grad():
        reference = peft_model(**batch).logits.float()
        merged = peft_model.merge_and_unload().eval()
        logits = merged(**batch).logits.float()
    diff = (reference - logits).abs().max().item()
    if diff > rtol * max(1.0, reference.abs().max().item()):
        raise ValueError(f"merge of {model_dir}: logits differ by {diff:.3g} from the adapter model's")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():  # processor / tokenizer files travel with the weights
        if f.is_file() and f.name not in {*ADAPTER_FILES, NON_LORA_FILE, BASE_FILE}:
            shutil.copy2(f, out / f.name)
    merged.save_pretrained(out)
    return diff


def main(argv: list[str] | None = None, builders: Builders = DEFAULT_BUILDERS) -> None:
    parser = argparse.ArgumentParser(prog="python -m rice_mllm.train.merge", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="LoRA checkpoint dir, its model/ dir, or a run dir")
    parser.add_argument("output_dir")
    args = parser.parse_args(argv)
    diff = merge(args.checkpoint, args.output_dir, builders)
    print(f"merged into {args.output_dir} (max logit difference {diff:.2e})")


if __name__ == "__main__":
    main()
