"""The multimodal model: mixed batches, named errors, self-contained checkpoints, export parity with transformers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessorPil

from rice_mllm.constants import CLIP_MEAN, CLIP_STD
from rice_mllm.data.collate import PaddingCollator
from rice_mllm.export import KIT_TO_LLAVA_NEXT, export_checkpoint, import_checkpoint, rename_keys, to_llava_next_config
from rice_mllm.mllm.anyres import num_image_tokens, num_tiles
from rice_mllm.mllm.assembly import TINY_TOKENIZER, build_processor
from rice_mllm.mllm.image_processing import RiceImageProcessor
from rice_mllm.mllm.modeling import ImageTokenMismatchError, RiceMllmForConditionalGeneration
from rice_mllm.mllm.processing import RiceMllmProcessor
from tests.fixtures import TINY_IMAGE_TOKEN_ID, tiny_mllm_config


def _sample_ids(num_tokens_per_image: list[int], length: int, generator: torch.Generator) -> torch.Tensor:
    """Random text ids (>= 6, never the image id) with each image's token run placed at a random offset."""
    ids = torch.randint(6, 100, (length,), generator=generator)
    position = 1
    for count in num_tokens_per_image:
        ids[position : position + count] = TINY_IMAGE_TOKEN_ID
        position += count + 3
    assert position <= length
    return ids


def _batch(model, images_per_sample: list[list[tuple[int, int]]], seed: int = 0) -> dict:
    """A right-padded batch: per sample, its image sizes; tiles are random pixels."""
    generator = torch.Generator().manual_seed(seed)
    counts = [[num_image_tokens(size, model.geometry) for size in sizes] for sizes in images_per_sample]
    length = max(sum(c) + 3 * len(c) + 6 for c in counts)
    rows, masks = [], []
    for sample_counts in counts:
        used = sum(sample_counts) + 3 * len(sample_counts) + 6
        row = _sample_ids(sample_counts, length, generator)
        row[used:] = 0
        rows.append(row)
        masks.append(torch.arange(length) < used)
    sizes = [size for sample in images_per_sample for size in sample]
    tiles = sum(num_tiles(size, model.geometry) for size in sizes)
    side = model.config.vision_config.image_size
    return {
        "input_ids": torch.stack(rows),
        "attention_mask": torch.stack(masks).long(),
        "pixel_values": torch.randn(tiles, 3, side, side, generator=generator),
        "image_sizes": torch.tensor(sizes, dtype=torch.long).reshape(-1, 2),
    }


REPO_ROOT = Path(__file__).resolve().parents[1]
MIXED = [[], [(30, 50)], [(60, 20), (28, 100)]]  # text-only, one image, two images


def test_mixed_batch_trains_every_part():
    model = RiceMllmForConditionalGeneration(tiny_mllm_config()).train()
    batch = _batch(model, MIXED)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == TINY_IMAGE_TOKEN_ID, -100)
    labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    without_grad = {name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0}
    assert without_grad == set(model.unused_parameter_names())
    for part in ("vision_tower.", "projector.", "image_newline", "language_model."):
        assert any(name.startswith(part) and p.grad is not None for name, p in model.named_parameters()), part


def test_text_only_batch_trains_without_images():
    model = RiceMllmForConditionalGeneration(tiny_mllm_config()).train()
    ids = torch.randint(6, 100, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.projector.linear_1.weight.grad is not None  # the zero-weighted vision path ran (ZeRO-3 safety)
    assert model.projector.linear_1.weight.grad.abs().sum() == 0


def test_placeholder_and_image_mismatches_raise_named_errors():
    model = RiceMllmForConditionalGeneration(tiny_mllm_config()).eval()
    batch = _batch(model, [[(30, 50)], [(60, 20)]])
    one_image_fewer = dict(batch, image_sizes=batch["image_sizes"][:1])
    with pytest.raises(ImageTokenMismatchError, match="tiles"):
        model(**one_image_fewer)
    tiles_first = num_tiles((30, 50), model.geometry)
    with pytest.raises(ImageTokenMismatchError, match=r"<image> tokens but its 1 images give"):
        model(**dict(one_image_fewer, pixel_values=batch["pixel_values"][:tiles_first]))
    with pytest.raises(ImageTokenMismatchError, match="no images"):
        model(input_ids=batch["input_ids"])
    with pytest.raises(ImageTokenMismatchError, match=r"batch_num_images \[1, 2\] sums to 3, image_sizes has 2"):
        model(**dict(batch, batch_num_images=torch.tensor([1, 2])))


def _logits_in_fresh_process(script: str, tmp_path, **tensors) -> dict:
    torch.save(tensors, tmp_path / "inputs.pt")
    code = (
        "import json, sys, torch\n"
        f"inputs = torch.load({str(tmp_path / 'inputs.pt')!r}, weights_only=False)  # written by this test\n"
        + script
        + f"\ntorch.save(result, {str(tmp_path / 'result.pt')!r})\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)
    return torch.load(tmp_path / "result.pt")


CONVERSATIONS = [
    (  # two images, two user turns
        [
            {"role": "user", "content": "<image>\n<image>\nWhat colour is the circle?"},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "And the word?"},
        ],
        [(70, 40), (30, 120)],
    ),
    ([{"role": "user", "content": "<image>\nHow many shapes?"}], [(50, 50)]),
]


def _images(sizes, seed):
    generator = np.random.default_rng(seed)
    return [Image.fromarray(generator.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


@pytest.fixture
def kit_checkpoint(tmp_path):
    """A tiny model and its processor (PIL resizing, so transformers' processor gives the same pixels)."""
    processor = build_processor(TINY_TOKENIZER, tile_size=28)
    processor.image_processor = RiceImageProcessor(processor.image_processor.geometry, resample="pil")
    vocab = len(processor.tokenizer)
    config = tiny_mllm_config(image_token_id=processor.image_token_id)
    config.text_config.vocab_size = vocab
    model = RiceMllmForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path / "kit")
    processor.save_pretrained(tmp_path / "kit")
    return model, processor, tmp_path / "kit"


def test_export_matches_transformers_llava_next_in_a_fresh_process(tmp_path, kit_checkpoint):
    model, processor, kit_dir = kit_checkpoint
    export_checkpoint(kit_dir, tmp_path / "hf")
    images = [_images(sizes, seed) for seed, (_, sizes) in enumerate(CONVERSATIONS)]
    samples = [
        processor(messages, imgs, add_generation_prompt=True)
        for (messages, _), imgs in zip(CONVERSATIONS, images, strict=True)
    ]
    batch = PaddingCollator(processor.pad_token_id)(samples)
    batch.pop("labels")
    with torch.no_grad():
        expected = model(**batch).logits
        first = {key: value[:1] for key, value in batch.items() if key in ("input_ids", "attention_mask")}
        first_tiles = sum(num_tiles(size, model.geometry) for size in CONVERSATIONS[0][1])
        generated = model.generate(
            **first,
            pixel_values=batch["pixel_values"][:first_tiles],
            image_sizes=batch["image_sizes"][:2],
            max_new_tokens=6,
            do_sample=False,
        )
    texts = [
        processor.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m, _ in CONVERSATIONS
    ]
    result = _logits_in_fresh_process(
        "from transformers import LlavaNextForConditionalGeneration as L, LlavaNextProcessor as P\n"
        "model, processor = L.from_pretrained('hf').eval(), P.from_pretrained('hf')\n"
        "images = [image for sample in inputs['images'] for image in sample]\n"
        "batch = processor(text=inputs['texts'], images=images, padding=True, return_tensors='pt')\n"
        "first = processor(text=inputs['texts'][:1], images=inputs['images'][0], return_tensors='pt')\n"
        "with torch.no_grad():\n"
        "    logits = model(**batch).logits\n"
        "    tokens = model.generate(**first, max_new_tokens=6, do_sample=False)\n"
        "new_tokens = tokens[:, first['input_ids'].shape[1]:]\n"
        "result = {'input_ids': batch['input_ids'], 'logits': logits, 'tokens': new_tokens}",
        tmp_path,
        texts=texts,
        images=images,
    )
    assert torch.equal(result["input_ids"], batch["input_ids"])  # same template, same image-token expansion
    mask = batch["attention_mask"].bool()
    assert (result["logits"] - expected)[mask].abs().max() <= 1e-4
    assert torch.equal(result["tokens"], generated)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llava_next"


def test_base_tiling_of_multi_image_samples_matches_transformers_llava_onevision():
    """Under "base" tiling, the kit's logits for a batch of a two-image and a one-image sample equal those of
    transformers' LlavaOnevisionForConditionalGeneration holding the same weights (OneVision keeps LLaVA-NeXT's
    parameter names), fed by its own image processor, which cuts multi-image samples the same way."""
    processor = build_processor(TINY_TOKENIZER, tile_size=28, multi_image_tiling="base")
    processor.image_processor = RiceImageProcessor(processor.image_processor.geometry, resample="pil")
    config = tiny_mllm_config(image_token_id=processor.image_token_id, multi_image_tiling="base")
    config.text_config.vocab_size = len(processor.tokenizer)
    model = RiceMllmForConditionalGeneration(config).eval()
    images = [_images(sizes, seed) for seed, (_, sizes) in enumerate(CONVERSATIONS)]
    samples = [
        processor(m, imgs, add_generation_prompt=True) for (m, _), imgs in zip(CONVERSATIONS, images, strict=True)
    ]
    batch = PaddingCollator(processor.pad_token_id)(samples)
    batch.pop("labels")
    assert batch["batch_num_images"].tolist() == [2, 1]
    assert batch["pixel_values"].shape[0] == 2 + num_tiles((50, 50), model.geometry)

    reference = LlavaOnevisionForConditionalGeneration(
        LlavaOnevisionConfig(
            vision_config=config.vision_config.to_dict(),
            text_config=config.text_config.to_dict(),
            image_token_index=config.image_token_id,
            projector_hidden_act=config.projector_hidden_act,
            vision_feature_select_strategy="default",
            vision_feature_layer=config.vision_feature_layer,
            image_grid_pinpoints=config.image_grid_pinpoints,
            tie_word_embeddings=config.text_config.tie_word_embeddings,
        )
    ).eval()
    reference.load_state_dict(rename_keys(model.state_dict(), KIT_TO_LLAVA_NEXT))
    reference_images = LlavaOnevisionImageProcessorPil(
        size={"height": 28, "width": 28},
        image_grid_pinpoints=config.image_grid_pinpoints,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )(images, return_tensors="pt")
    with torch.no_grad():
        expected = reference(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **reference_images
        ).logits
        logits = model(**batch).logits
    mask = batch["attention_mask"].bool()
    assert (logits - expected)[mask].abs().max() <= 1e-4


def test_import_back_from_transformers_is_exact(tmp_path, kit_checkpoint):
    model, processor, kit_dir = kit_checkpoint
    export_checkpoint(kit_dir, tmp_path / "hf")
    import_checkpoint(tmp_path / "hf", tmp_path / "back")
    back = RiceMllmForConditionalGeneration.from_pretrained(tmp_path / "back")
    assert RiceMllmProcessor.from_pretrained(tmp_path / "back").num_image_tokens(
        (70, 40)
    ) == processor.num_image_tokens((70, 40))
    for (name, original), (_, reloaded) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(original, reloaded), name


@pytest.mark.parametrize("setting", [{"max_grid_tiles": 2}, {"multi_image_tiling": "base"}])
def test_export_refuses_what_llava_next_does_not_reproduce(setting):
    with pytest.raises(ValueError, match=next(iter(setting))):
        to_llava_next_config(tiny_mllm_config(**setting))


def test_gradient_checkpointing_gives_equal_loss_and_gradients():
    model = RiceMllmForConditionalGeneration(tiny_mllm_config()).train()
    batch = _batch(model, MIXED, seed=3)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == TINY_IMAGE_TOKEN_ID, -100)

    def loss_and_grads():
        model.zero_grad()
        loss = model(**batch, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = loss_and_grads()
    model.activation_checkpointing_enable()
    ckpt_loss, ckpt_grads = loss_and_grads()
    torch.testing.assert_close(ckpt_loss, plain_loss)
    assert plain_grads.keys() == ckpt_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, msg=name)


def test_checkpoint_reloads_alone_in_a_fresh_process(tmp_path, kit_checkpoint):
    """Model and processor come back from the directory alone (moved away from where it was written)."""
    model, processor, kit_dir = kit_checkpoint
    moved = kit_dir.rename(tmp_path / "elsewhere")
    images = [_images(sizes, seed) for seed, (_, sizes) in enumerate(CONVERSATIONS)]
    samples = [processor(m, imgs) for (m, _), imgs in zip(CONVERSATIONS, images, strict=True)]
    with torch.no_grad():
        expected = model(**PaddingCollator(processor.pad_token_id)(samples)).logits
    result = _logits_in_fresh_process(
        "from rice_mllm.data.collate import PaddingCollator\n"
        "from rice_mllm.mllm.modeling import RiceMllmForConditionalGeneration as M\n"
        "from rice_mllm.mllm.processing import RiceMllmProcessor as P\n"
        f"model, processor = M.from_pretrained({str(moved)!r}).eval(), P.from_pretrained({str(moved)!r})\n"
        "samples = [processor(m, imgs) for m, imgs in zip(inputs['messages'], inputs['images'])]\n"
        "with torch.no_grad(): result = model(**PaddingCollator(processor.pad_token_id)(samples)).logits",
        tmp_path,
        messages=[m for m, _ in CONVERSATIONS],
        images=images,
    )
    assert torch.equal(result, expected)


def test_bf16_forward_and_backward_run_and_track_fp32():
    model = RiceMllmForConditionalGeneration(tiny_mllm_config()).eval()
    batch = _batch(model, MIXED, seed=4)
    with torch.no_grad():
        reference = model(**batch).logits
    half = model.to(torch.bfloat16)
    logits = half(**dict(batch, pixel_values=batch["pixel_values"].to(torch.bfloat16))).logits
    assert logits.dtype == torch.bfloat16
    mask = batch["attention_mask"].bool()
    assert (logits.float() - reference)[mask].abs().max() < 0.1 * reference[mask].abs().max()
    logits.float()[mask].sum().backward()
    assert half.projector.linear_1.weight.grad.dtype == torch.bfloat16
