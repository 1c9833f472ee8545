"""Region tokens: each box's feature is stage 0's region transformer over the image's base tile, then the projector."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rice_mllm.constants import IGNORE_INDEX, REGION_FEATURE_TOKEN
from rice_mllm.data.collate import PaddingCollator
from rice_mllm.data.packing import PackingCollator
from rice_mllm.inference import answer, load_for_inference
from rice_mllm.mllm.anyres import num_image_tokens, num_tiles
from rice_mllm.mllm.assembly import TINY_TOKENIZER, build_processor
from rice_mllm.mllm.boxes import RegionError
from rice_mllm.mllm.modeling import RegionTokenMismatchError, RiceMllmForConditionalGeneration
from rice_mllm.mllm.processing import RiceMllmProcessor
from rice_mllm.mllm.region_tokens import boxes_on_base_tile
from rice_mllm.pretrain.region_head import box_patch_masks, encode_for_regions, region_attention
from rice_mllm.serve.app import ServeOptions, create_app
from rice_mllm.serve.cli import serving
from rice_mllm.train.trainer import main as train_main
from tests.fixtures import TINY_IMAGE_TOKEN_ID, tiny_mllm_config
from tests.test_serve import NAME, _client, _image, _text, _together

ROOT = Path(__file__).resolve().parents[1]

REGION = 7  # any id of the tiny vocabulary other than the image token


def _model(region_token_id=REGION, seed=0, projector_type="mlp2x_gelu"):
    torch.manual_seed(seed)
    config = tiny_mllm_config(region_token_id=region_token_id, projector_type=projector_type)
    return RiceMllmForConditionalGeneration(config).eval()


def _batch(model, num_regions):
    """One tiled 28 x 56 image (1x2 grid: base + 2 tiles), then `num_regions` region tokens."""
    image_tokens = num_image_tokens((28, 56), model.geometry)
    ids = [1, *[TINY_IMAGE_TOKEN_ID] * image_tokens, 2, *[REGION] * num_regions, 3]
    torch.manual_seed(1)
    return {
        "input_ids": torch.tensor([ids]),
        "pixel_values": torch.randn(3, 3, 28, 28),
        "image_sizes": torch.tensor([[28, 56]]),
    }


def test_boxes_map_to_the_base_tile_by_hand():
    boxes = torch.tensor([[0, 0, 500, 1000], [0, 0, 500, 1000]])
    sizes = torch.tensor([[100, 200], [100, 200]])  # height 100, width 200
    tiled = torch.tensor([True, False])
    got = boxes_on_base_tile(boxes, sizes, tiled, 56)
    # squashed: 0-1000 scale straight to 56 px; padded: the image sits at rows 50-150 of a 200 px square
    expected = torch.tensor([[0.0, 0.0, 28.0, 56.0], [0.0, 14.0, 28.0, 42.0]])
    torch.testing.assert_close(got, expected)


def test_region_features_equal_stage_0s_region_transformer_on_the_base_tile():
    model = _model()
    batch = _batch(model, 2)
    boxes = torch.tensor([[0, 0, 500, 1000], [250, 500, 1000, 1000]])
    with torch.no_grad():
        embeds = model.embed_inputs(**batch, region_boxes=boxes, region_images=torch.tensor([0, 0]))
        got = embeds[0, batch["input_ids"][0] == REGION]
        # reference: a separate stage-0 encoder pass over the base tile, boxes in its pixels by hand (28 px tile)
        tokens, angles = encode_for_regions(model.vision_tower, batch["pixel_values"][:1])
        pixels = torch.tensor([[[0.0, 0.0, 14.0, 28.0], [7.0, 14.0, 28.0, 28.0]]])
        masks = box_patch_masks(pixels, (2, 2), model.config.vision_config.patch_size)
        heads = model.config.vision_config.num_attention_heads
        expected = model.projector(region_attention(tokens, masks, angles, heads)[0])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got[0], got[1])


def test_region_tokens_leave_image_features_and_text_unchanged():
    with_regions, without = _model(), _model(region_token_id=None)
    batch = _batch(with_regions, 1)
    with torch.no_grad():
        a = with_regions.embed_inputs(
            **batch, region_boxes=torch.tensor([[0, 0, 1000, 1000]]), region_images=torch.tensor([0])
        )
        b = without.embed_inputs(**batch)
    keep = batch["input_ids"][0] != REGION
    torch.testing.assert_close(a[0, keep], b[0, keep])


@pytest.mark.parametrize("num_boxes", [0, 2])
def test_a_box_count_unlike_the_region_tokens_is_named(num_boxes):
    model = _model()
    with pytest.raises(RegionTokenMismatchError, match=rf"1 region tokens, {num_boxes} region_boxes"):
        model.embed_inputs(
            **_batch(model, 1),
            region_boxes=torch.zeros(num_boxes, 4),
            region_images=torch.zeros(num_boxes, dtype=torch.long),
        )


def test_a_box_of_a_missing_image_is_named():
    model = _model()
    with pytest.raises(RegionTokenMismatchError, match=r"region_images \[1\] for 1 images"):
        model.embed_inputs(**_batch(model, 1), region_boxes=torch.zeros(1, 4), region_images=torch.tensor([1]))


@pytest.mark.parametrize("num_regions", [0, 1])
def test_training_reaches_every_vision_parameter_with_or_without_boxes(num_regions):
    """Region tokens run every block and post_layernorm on every rank: no parameter is left without a gradient."""
    model = _model().train()
    assert model.unused_parameter_names() == []
    batch = _batch(model, num_regions)
    labels = batch["input_ids"].clone()
    boxes = torch.tensor([[100, 100, 900, 900]] * num_regions).reshape(-1, 4)
    images = torch.zeros(num_regions, dtype=torch.long)
    model(**batch, labels=labels, region_boxes=boxes, region_images=images).loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert missing == []
    post_norm = model.vision_tower.vision_model.post_layernorm.weight.grad
    assert (post_norm.abs().sum() > 0) == bool(num_regions)


def _sample(model, sizes, boxes, owners, seed):
    """A hand-built processor sample: its images' tokens, a few text tokens, one region token per box."""
    geometry, generator = model.geometry, torch.Generator().manual_seed(seed)
    ids = [1]
    for size in sizes:
        ids += [TINY_IMAGE_TOKEN_ID] * num_image_tokens(size, geometry) + [2]
    ids += [REGION] * len(boxes) + [3, 4, 6, 8][: 2 + seed % 3]
    ids = torch.tensor(ids)
    tiles = sum(num_tiles(size, geometry) for size in sizes)
    return {
        "input_ids": ids,
        "labels": torch.where((ids == TINY_IMAGE_TOKEN_ID) | (ids == REGION), IGNORE_INDEX, ids),
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(tiles, 3, 28, 28, generator=generator),
        "image_sizes": torch.tensor(sizes).reshape(-1, 2),
        "batch_num_images": torch.tensor([len(sizes)]),
        "region_boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "region_images": torch.tensor(owners, dtype=torch.long),
    }


@pytest.mark.parametrize("projector_type", ["mlp2x_gelu", "patch_merger", "mlp2x_gelu_block"])
def test_padded_and_packed_batches_with_boxes_give_the_loss_and_gradients_of_samples_alone(projector_type):
    """Boxes stay with their samples' images through both collators (region_images renumbered per batch)."""
    model = _model(projector_type=projector_type).train()
    samples = [
        _sample(model, [(28, 56)], [[0, 0, 500, 1000]], [0], seed=0),
        _sample(model, [], [], [], seed=1),
        _sample(model, [(56, 28), (28, 28)], [[100, 100, 900, 900], [0, 500, 1000, 1000]], [1, 0], seed=2),
    ]

    def loss_and_grads(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def alone():
        total, count = 0.0, 0
        for sample in samples:
            batch = PaddingCollator(0)([sample])
            labels = batch.pop("labels")
            model.eval()  # logits, then the loss by hand: the sum over this sample's supervised tokens
            logits = model(**batch).logits[0]
            model.train()
            targets = labels[0, 1:]
            total = total + F.cross_entropy(logits[:-1], targets, ignore_index=IGNORE_INDEX, reduction="sum")
            count += int((targets != IGNORE_INDEX).sum())
        return total / count

    reference = loss_and_grads(alone)
    for collate in (PaddingCollator(0), PackingCollator(10_000, 0)):  # one packed row: samples in order
        batch = collate(samples)
        assert batch["region_images"].tolist() == [0, 2, 1]  # sample 2's boxes name images 1 and 0 of its own
        loss, grads = loss_and_grads(lambda batch=batch: model(**batch).loss)
        assert abs(loss - reference[0]) <= 1e-5 * abs(reference[0])
        for name, grad in reference[1].items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


# ---- the processor and the trainer ----
BOX_A, BOX_B = "<|box_start|>(0,0),(500,1000)<|box_end|>", "<|box_start|>(100,200),(300,400)<|box_end|>"


@pytest.fixture(scope="module")
def region_processor():
    return build_processor(TINY_TOKENIZER, tile_size=28, region_tokens=True)


def test_the_processor_follows_each_user_box_with_a_region_token_and_returns_the_boxes(region_processor):
    messages = [
        {"role": "user", "content": f"<image>\nWhat is at {BOX_A}?"},
        {"role": "assistant", "content": f"a circle, also at {BOX_B}"},
        {"role": "user", "content": f"<image>\nAnd at {BOX_B} here?"},
        {"role": "assistant", "content": "a star"},
    ]
    images = [Image.new("RGB", (56, 28)), Image.new("RGB", (28, 28))]
    sample = region_processor(messages, images)
    region_id = region_processor.region_token_id
    positions = (sample["input_ids"] == region_id).nonzero().flatten().tolist()
    assert len(positions) == 2  # the assistant's box is the model's to write: no feature token
    for position in positions:  # right after a box's closing token, never supervised
        assert region_processor.tokenizer.decode(sample["input_ids"][:position]).endswith("<|box_end|>")
        assert sample["labels"][position] == IGNORE_INDEX
    assert sample["region_boxes"].tolist() == [[0, 0, 500, 1000], [100, 200, 300, 400]]
    assert sample["region_images"].tolist() == [0, 1]


def test_text_holding_the_region_token_itself_is_refused(region_processor):
    messages = [{"role": "user", "content": f"<image>\n{REGION_FEATURE_TOKEN} what?"}]
    with pytest.raises(RegionError, match=r"1 <\|region_pad\|> tokens for 0 boxes"):
        region_processor(messages, [Image.new("RGB", (28, 28))])


def test_without_region_tokens_boxes_stay_text(tmp_path, region_processor):
    plain = build_processor(TINY_TOKENIZER, tile_size=28)
    sample = plain([{"role": "user", "content": f"<image>\n{BOX_A}"}], [Image.new("RGB", (28, 28))])
    assert "region_boxes" not in sample and plain.region_token_id is None
    region_processor.save_pretrained(tmp_path)
    reloaded = RiceMllmProcessor.from_pretrained(tmp_path)
    assert reloaded.region_token_id == region_processor.region_token_id


def _region_records(folder: Path) -> Path:
    """Four LLaVA records with pixel boxes: 'What colour is the shape at <region>?'."""
    records = []
    for index, colour in enumerate(["red", "blue", "red", "blue"]):
        image = Image.new("RGB", (64, 48), "white")
        image.paste(colour, (8 + index, 8, 40, 40))
        image.save(folder / f"{index}.png")
        records.append(
            {
                "image": f"{index}.png",
                "regions": [[8 + index, 8, 40, 40]],
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is the shape at <region>?"},
                    {"from": "gpt", "value": colour},
                ],
            }
        )
    path = folder / "regions.json"
    path.write_text(json.dumps(records))
    return path


def _stage2_arguments(folder: Path) -> list[str]:
    """Two stage-2 steps with region tokens on `_region_records`, from scratch."""
    return [
        "--config",
        str(ROOT / "recipes" / "stage2_instruct.yaml"),
        f"output_dir={folder / 'run'}",
        "data.tiny_world=null",
        f"data.train_files=[{_region_records(folder)}]",
        "data.template=chatml",
        "model.init_from=null",
        "model.region_tokens=true",
        "optim.max_steps=2",
        "optim.batch_size=2",
        "deepspeed=null",
    ]


def test_a_model_with_region_tokens_trains_saves_and_answers_about_a_box(tmp_path):
    args = _stage2_arguments(tmp_path)
    data = tmp_path / "regions.json"
    train_main(args)
    model, processor = load_for_inference(tmp_path / "run", device="cpu")
    assert model.config.region_token_id == processor.region_token_id is not None
    messages = [{"role": "user", "content": f"<image>\nWhat colour is the shape at {BOX_A}?"}]
    reply = answer(model, processor, messages, [Image.open(tmp_path / "0.png")], max_new_tokens=3)
    assert isinstance(reply, str)
    again = [*args, f"model.init_from={tmp_path / 'run'}", f"output_dir={tmp_path / 'again'}"]
    for setting in ("true", "false"):  # the checkpoint decides; either value given beside it is an error
        with pytest.raises(ValueError, match="fixes them"):
            train_main([*again, f"model.region_tokens={setting}"])
    lora = [  # LoRA on top: the adapters train on the same boxes, and the adapter checkpoint answers
        "--config",
        str(ROOT / "recipes" / "finetune_lora.yaml"),
        f"model.init_from={tmp_path / 'run'}",
        f"output_dir={tmp_path / 'lora'}",
        "data.tiny_world=null",
        f"data.train_files=[{data}]",
        "optim.max_steps=2",
        "optim.batch_size=2",
        "deepspeed=null",
    ]
    train_main(lora)
    model, processor = load_for_inference(tmp_path / "lora", device="cpu")
    assert processor.region_token_id is not None
    assert isinstance(answer(model, processor, messages, [Image.open(tmp_path / "1.png")], max_new_tokens=3), str)


def test_the_server_reads_boxes_in_text_as_chat_does(tmp_path):
    """A request's box text brings its region token through the server's batched generate; a box-free request in
    the same batch is answered as alone."""
    train_main(_stage2_arguments(tmp_path))
    model, processor = load_for_inference(tmp_path / "run", device="cpu")
    images = [Image.open(tmp_path / f"{index}.png") for index in range(2)]
    questions = [f"What colour is the shape at {BOX_A}?", "What colour is the shape?"]
    expected = [
        answer(model, processor, [{"role": "user", "content": f"<image>\n{question}"}], [image], max_new_tokens=4)
        for question, image in zip(questions, images, strict=True)
    ]
    requests = [
        {"messages": [{"role": "user", "content": [_image(image), _text(question)]}], "max_tokens": 4}
        for question, image in zip(questions, images, strict=True)
    ]
    app = create_app(model, processor, ServeOptions(model_name=NAME, max_tokens=4, batch_wait_s=0.5))
    with serving(app) as url:
        replies = _together(_client(url), requests)
    assert [reply.choices[0].message.content for reply in replies] == expected
    assert sum(app.state.batcher.batch_sizes.values()) == 1  # both rows in one generate
