"""RicePretrainModel on a tiny labelled region batch: gradients everywhere, learning, encoder-only artefact."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoTokenizer, MLCDVisionModel

from rice_mllm.data.synthetic import generate
from rice_mllm.mllm.assembly import TINY_TOKENIZER
from rice_mllm.presets import load_preset
from rice_mllm.pretrain.clusters import LABEL_HASH_TEACHER, label_region_file
from rice_mllm.pretrain.modeling import RegionPretrainConfig, RicePretrainModel
from rice_mllm.pretrain.region_data import OCR, RegionDataset, collate_regions, patch_budget_size
from rice_mllm.pretrain.region_head import box_patch_masks, encode_for_regions
from rice_mllm.vision import RiceVisionConfig, RiceVisionModel


@pytest.fixture
def batch(tmp_path):
    rng = np.random.default_rng(0)
    lines = []
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        objects = [{"box": [10 * j, 5, 10 * j + 30, 40], "cluster": (i + j) % 5} for j in range(4)]
        ocr = [{"box": [0, 40, 80, 60], "text": "ab", "tokens": [3, 9]}]
        lines.append(json.dumps({"image": f"{i}.png", "objects": objects, "ocr": ocr}))
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    dataset = RegionDataset(tmp_path / "d.jsonl", image_size=56, num_regions=6, max_tokens=4)
    return collate_regions([dataset[0], dataset[1]])


def _model(**overrides):
    config = RegionPretrainConfig(num_clusters=5, vocab_size=12, embed_dim=16, sample_ratio=1.0, **overrides)
    return RicePretrainModel(RiceVisionConfig(**load_preset("rice-vit-tiny")), config)


def test_every_parameter_gets_a_gradient_and_parts_add_up(batch):
    model = _model(ocr_loss_weight=0.5)
    out = model(**batch)
    assert out.num_objects + out.num_ocr == 12 and out.num_ocr == int((batch["kinds"] == OCR).sum()) > 0
    torch.testing.assert_close(out.loss, out.object_loss + 0.5 * out.ocr_loss)
    out.loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []  # post_layernorm included: the region transformer normalises every token with it
    assert model.sharded_parameter_names() == ["object_loss.weight", "ocr_loss.weight"]
    assert model.object_loss.weight.shape == (5, 16) and model.ocr_loss.weight.shape == (12, 16)


def test_patch_budget_keeps_the_aspect_ratio_hand_computed():
    # 80x60 at 16 patches of 14 px: scale sqrt(16 * 196 / 4800) = 0.808 -> 3.46 rows, 4.62 columns -> 3 x 4.
    assert patch_budget_size(80, 60, 14, 16) == (42, 56)
    # 2000x100: 0.89 rows -> 1, then at most 16 columns (17.9 would exceed the budget).
    assert patch_budget_size(2000, 100, 14, 16) == (14, 224)
    assert patch_budget_size(100, 2000, 14, 16) == (224, 14)


def test_images_of_other_aspect_ratios_in_one_batch_equal_each_image_alone(tmp_path):
    rng = np.random.default_rng(1)
    lines = []
    for i, (height, width) in enumerate([(60, 80), (100, 30), (60, 80)]):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        objects = [{"box": [2, 3, width - 5, height // 2], "cluster": i}, {"box": [0, 0, width, height], "cluster": 1}]
        lines.append(json.dumps({"image": f"{i}.png", "objects": objects}))
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    dataset = RegionDataset(tmp_path / "d.jsonl", image_size=56, num_regions=2, max_patches=12, patch_size=14)
    samples = [dataset[i] for i in range(3)]
    assert [tuple(s["pixel_values"].shape[1:]) for s in samples] == [(42, 56), (84, 14), (42, 56)]
    assert [0.0, 0.0, 14.0, 84.0] in samples[1]["boxes"].tolist()  # the whole-image box, scaled to 14x84
    batch = collate_regions(samples)
    assert batch["pixel_values"].shape == (3, 3, 84, 56)
    assert batch["image_sizes"].tolist() == [[42, 56], [84, 14], [42, 56]]
    model = _model().eval()
    with torch.no_grad():
        together = model.region_embeddings(batch["pixel_values"], batch["boxes"], batch["image_sizes"])
        for i, sample in enumerate(samples):
            alone = model.region_embeddings(sample["pixel_values"][None], sample["boxes"][None])
            torch.testing.assert_close(together[i], alone[0], rtol=1e-5, atol=1e-6)


def test_rope_jitter_moves_the_region_heads_origin_in_training_only(batch):
    model = _model(rope_jitter=3)
    pixels, boxes = batch["pixel_values"], batch["boxes"]
    masks = box_patch_masks(boxes, (4, 4), 14)
    with torch.no_grad():
        at_origin = {}
        for origin in [(row, col) for row in range(4) for col in range(4)]:
            tokens, angles = encode_for_regions(model.encoder, pixels, origin)
            at_origin[origin] = model.region_head(tokens, masks, angles)
        model.eval()
        torch.testing.assert_close(model.region_embeddings(pixels, boxes), at_origin[(0, 0)], rtol=0, atol=0)
        model.train()
        torch.manual_seed(0)
        drawn = []
        for _ in range(12):
            got = model.region_embeddings(pixels, boxes)
            drawn += [origin for origin, expected in at_origin.items() if torch.equal(got, expected)]
    assert len(drawn) == 12 and len(set(drawn)) > 3  # every draw is one origin of [0, 3]^2, and they vary


def test_loss_decreases_on_a_fixed_batch(batch):
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < 0.7 * losses[0], losses


def test_stage0_artefact_is_the_plain_encoder(batch, tmp_path):
    model = _model()
    model.save_pretrained(tmp_path / "enc")
    keys = set(load_file(tmp_path / "enc" / "model.safetensors"))
    # MLCD layout, no head or centre tensors.
    assert keys == set(model.encoder.state_dict()) and all(k.startswith("vision_model.") for k in keys)
    reloaded = RicePretrainModel.from_encoder(tmp_path / "enc", model.config)
    transformers_model = MLCDVisionModel.from_pretrained(tmp_path / "enc").eval()
    with torch.no_grad():
        expected = model.encoder(batch["pixel_values"]).last_hidden_state
        torch.testing.assert_close(reloaded.encoder(batch["pixel_values"]).last_hidden_state, expected)
        torch.testing.assert_close(
            transformers_model(batch["pixel_values"]).last_hidden_state, expected, atol=1e-5, rtol=0
        )
    assert isinstance(reloaded.encoder, RiceVisionModel)


def test_ocr_regions_without_ocr_loss_raise(batch):
    model = _model()
    model.ocr_loss = None
    with pytest.raises(ValueError, match="OCR regions"):
        model(**batch)


def test_tiny_world_labels_and_trains(tmp_path):
    """Synthetic world -> label-hash clusters + tiny-tokenizer OCR tokens -> dataset -> one step."""
    generate(tmp_path, num_images=8, num_heldout=1)
    regions = tmp_path / "regions_train.jsonl"
    labels = {o["label"] for line in regions.read_text().splitlines() for o in json.loads(line)["objects"]}
    labelled = tmp_path / "labelled.jsonl"
    counts = label_region_file(regions, labelled, LABEL_HASH_TEACHER, len(labels), tokenizer_dir=TINY_TOKENIZER)
    assert counts["clusters"] == len(labels) and counts["ocr"] > 0
    # K = number of distinct labels: each cluster is exactly one shape + colour class.
    by_cluster = {}
    for line in labelled.read_text().splitlines():
        for o in json.loads(line)["objects"]:
            by_cluster.setdefault(o["cluster"], set()).add(o["label"])
    assert all(len(names) == 1 for names in by_cluster.values())
    dataset = RegionDataset(labelled, image_size=56)
    vocab = len(AutoTokenizer.from_pretrained(TINY_TOKENIZER))
    model = RicePretrainModel(
        RiceVisionConfig(**load_preset("rice-vit-tiny")),
        RegionPretrainConfig(num_clusters=len(labels), vocab_size=vocab, embed_dim=16),
    )
    out = model(**collate_regions([dataset[i] for i in range(4)]))
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.num_objects > 0


def _two_rank_worker(rank, port, batch, state, out_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = _model().double()  # this rank's half of every centre matrix
        model.load_state_dict({k: v for k, v in state.items() if not k.endswith("_loss.weight")}, strict=False)
        with torch.no_grad():
            for loss in (model.object_loss, model.ocr_loss):
                name = "object_loss.weight" if loss is model.object_loss else "ocr_loss.weight"
                loss.weight.copy_(state[name][loss.class_start : loss.class_end])
        half = {key: value[rank : rank + 1] for key, value in batch.items()}  # one image per rank
        model(**half).loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if name.startswith("encoder.")}
        torch.save(grads, f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.multirank
def test_the_average_of_the_ranks_encoder_gradients_is_the_one_process_gradient(batch, tmp_path):
    """Each rank's loss is the global batch's; data-parallel engines average gradients, so the model scales the
    embeddings' gradient by the world size: the average over ranks equals the gradient of one process."""
    import socket

    import torch.multiprocessing as mp

    torch.manual_seed(0)
    model = _model().double()  # float64: the comparison is of the gradient's scale, not of rounding
    batch = {key: value.double() if value.is_floating_point() else value for key, value in batch.items()}
    model(**batch).loss.backward()
    expected = {name: p.grad for name, p in model.named_parameters() if name.startswith("encoder.")}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mp.start_processes(_two_rank_worker, args=(port, batch, state, str(tmp_path)), nprocs=2, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, grad in expected.items():
        torch.testing.assert_close((ranks[0][name] + ranks[1][name]) / 2, grad, rtol=1e-7, atol=1e-10)
