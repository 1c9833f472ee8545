"""Region JSONL: checker reports every bad record, COCO conversion, Dataset pixels/boxes/sampling/labels, CLIs."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from rice_mllm.constants import CLIP_MEAN, CLIP_STD
from rice_mllm.pretrain.region_convert import convert_coco
from rice_mllm.pretrain.region_data import (
    OBJECT,
    OCR,
    RegionDataError,
    RegionDataset,
    check_region_file,
    collate_regions,
    main,
)


def _image(path, width=100, height=50, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def _write(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_check_reports_every_bad_record_with_line_and_field(tmp_path):
    _image(tmp_path / "a.png")  # 100 x 50
    data = _write(
        tmp_path / "d.jsonl",
        [
            {"image": "a.png", "objects": [{"box": [0, 0, 100, 50], "label": "red circle", "cluster": 3}]},
            {"image": "missing.png", "objects": [{"box": [0, 0, 10, 10]}]},
            {"image": "a.png", "objects": [{"box": [10, 10, 10, 20]}, {"box": [0, 0, 101, 50]}]},
            "{not json",
            {"image": "a.png", "ocr": [{"box": [1, 1, 5, 5], "text": "  "}, {"box": [1, 2, 3], "text": "hi"}]},
            {"image": "a.png"},
            {"image": "a.png", "objects": [{"box": [0, 0, 5, 5], "cluster": -2}]},
        ],
    )
    # A JSON error stops parsing: it is reported alone, by line.
    assert [(i.line, i.field) for i in check_region_file(data)] == [(4, "json")]
    lines = data.read_text().splitlines()
    _write(data, lines[:3] + lines[4:])
    found = {(i.line, i.field) for i in check_region_file(data)}
    assert found == {
        (2, "image"),
        (3, "objects[0].box"),
        (3, "objects[1].box"),
        (4, "ocr[0].text"),
        (4, "ocr[1].box"),
        (5, "objects/ocr"),
        (6, "objects[0].cluster"),
    }
    messages = {(i.line, i.field): i.message for i in check_region_file(data)}
    assert "degenerate" in messages[(3, "objects[0].box")] and "outside the 100x50" in messages[(3, "objects[1].box")]
    # Without images the bounds and existence are not checked; required labels are.
    found = {(i.line, i.field) for i in check_region_file(data, check_images=False, require_labels=True)}
    assert (2, "image") not in found and (3, "objects[1].box") not in found
    assert (2, "objects[0].cluster") in found and (4, "ocr[1].tokens") in found


def test_coco_conversion(tmp_path):
    (tmp_path / "img").mkdir()
    _image(tmp_path / "img" / "1.png")
    coco = {
        "images": [
            {"id": 1, "file_name": "1.png", "width": 100, "height": 50},
            {"id": 2, "file_name": "2.png", "width": 10, "height": 10},
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 9, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 5, 20, 30], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 9, "bbox": [90, 40, 20, 20], "iscrowd": 0},  # clipped
            {"id": 3, "image_id": 1, "category_id": 9, "bbox": [0, 0, 50, 50], "iscrowd": 1},
            {"id": 4, "image_id": 2, "category_id": 9, "bbox": [12, 0, 5, 5], "iscrowd": 0},  # outside -> degenerate
        ],
    }
    (tmp_path / "inst.json").write_text(json.dumps(coco))
    out = tmp_path / "out" / "regions.jsonl"
    counts = convert_coco(tmp_path / "inst.json", tmp_path / "img", out)
    assert counts == {"images": 1, "objects": 2, "crowd": 1, "degenerate": 1, "small": 0, "images_without_boxes": 1}
    # the paper's size filter: the 20x30 dog stays at 20 px, the clipped 10x10 cat goes
    counts = convert_coco(tmp_path / "inst.json", tmp_path / "img", tmp_path / "big.jsonl", min_edge=20)
    assert counts["small"] == 1 and counts["objects"] == 1
    [record] = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["image"] == "../img/1.png"
    assert record["objects"] == [{"box": [10, 5, 30, 35], "label": "dog"}, {"box": [90, 40, 100, 50], "label": "cat"}]
    assert check_region_file(out) == []
    coco["annotations"].append({"id": 5, "image_id": 3, "category_id": 7, "bbox": [0, 0, 1, 1]})
    (tmp_path / "inst.json").write_text(json.dumps(coco))
    with pytest.raises(KeyError, match="annotation 5"):
        convert_coco(tmp_path / "inst.json", tmp_path / "img", out)


def _labelled(tmp_path, num_objects, num_ocr=0):
    _image(tmp_path / "a.png")
    objects = [{"box": [i, 0, i + 10, 20], "cluster": i} for i in range(num_objects)]
    ocr = [{"box": [0, 30, 40, 50], "text": "hello", "tokens": [5, 6, 5, 7, 8]}] * num_ocr
    return _write(tmp_path / "d.jsonl", [{"image": "a.png", "objects": objects, "ocr": ocr}])


def test_dataset_pixels_and_boxes(tmp_path):
    data = _labelled(tmp_path, 1)
    sample = RegionDataset(data, image_size=28, num_regions=1)[0]
    reference = CLIPImageProcessorPil(
        size={"height": 28, "width": 28}, do_center_crop=False, image_mean=CLIP_MEAN, image_std=CLIP_STD
    )(Image.open(tmp_path / "a.png"), return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(sample["pixel_values"], reference, atol=1e-5, rtol=0)
    # 100x50 -> 28x28: x * 0.28, y * 0.56.
    torch.testing.assert_close(sample["boxes"], torch.tensor([[0.0, 0.0, 2.8, 11.2]]))


def test_sampling_without_replacement_and_reproducible(tmp_path):
    data = _labelled(tmp_path, 25)
    dataset = RegionDataset(data, image_size=28, num_regions=10, seed=3)
    first = dataset[0]
    clusters = first["labels"][:, 0]
    assert clusters.unique().numel() == 10 and (first["kinds"] == OBJECT).all()
    # Labels travel with boxes: object i has box x0 = i.
    torch.testing.assert_close(first["boxes"][:, 0], clusters.float() * 0.28)
    assert torch.equal(RegionDataset(data, image_size=28, num_regions=10, seed=3)[0]["labels"], first["labels"])
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0]["labels"], first["labels"])


def test_resampling_with_replacement_and_ocr_labels(tmp_path):
    data = _labelled(tmp_path, 2, num_ocr=1)
    sample = RegionDataset(data, image_size=28, num_regions=10, max_tokens=3)[0]
    labels, kinds = sample["labels"], sample["kinds"]
    assert labels.shape == (10, 3) and sample["valid"].all()
    objects = labels[kinds == OBJECT]
    assert set(objects[:, 0].tolist()) == {0, 1} and (objects[:, 1:] == -1).all()
    ocr = labels[kinds == OCR]
    assert len(ocr) >= 1 and (ocr == torch.tensor([5, 6, 7])).all()  # distinct tokens, first P kept
    batch = collate_regions([sample, sample])
    assert batch["pixel_values"].shape == (2, 3, 28, 28) and batch["boxes"].shape == (2, 10, 4)
    assert batch["labels"].shape == (2, 10, 3) and batch["valid"].shape == (2, 10)


def test_dataset_refuses_unlabelled_data(tmp_path):
    _image(tmp_path / "a.png")
    data = _write(tmp_path / "d.jsonl", [{"image": "a.png", "objects": [{"box": [0, 0, 5, 5], "label": "x"}]}])
    with pytest.raises(RegionDataError, match=r"d.jsonl:1: objects\[0\].cluster"):
        RegionDataset(data, image_size=28)


def test_cli_check_and_convert(tmp_path, capsys):
    _image(tmp_path / "a.png")
    good = _write(tmp_path / "good.jsonl", [{"image": "a.png", "objects": [{"box": [0, 0, 5, 5]}]}])
    bad = _write(tmp_path / "bad.jsonl", [{"image": "a.png", "objects": [{"box": [0, 0, 500, 5]}]}])
    assert main(["check", str(good)]) == 0
    assert main(["check", str(good), str(bad)]) == 1
    assert "bad.jsonl:1: objects[0].box" in capsys.readouterr().out
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 50}],
        "categories": [{"id": 1, "name": "c"}],
    }
    coco["annotations"] = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 3]}]
    (tmp_path / "inst.json").write_text(json.dumps(coco))
    out = tmp_path / "conv.jsonl"
    assert (
        main(["convert-coco", "--instances", str(tmp_path / "inst.json"), "--images", str(tmp_path), "--out", str(out)])
        == 0
    )
    assert main(["check", str(out)]) == 0


def test_dataset_reports_box_outside_image_at_load(tmp_path):
    _image(tmp_path / "a.png")  # 100 x 50
    record = {"image": "a.png", "objects": [{"box": [0, 0, 5, 5], "cluster": 0}, {"box": [0, 0, 5, 60], "cluster": 1}]}
    dataset = RegionDataset(_write(tmp_path / "d.jsonl", [record]), image_size=28)
    with pytest.raises(RegionDataError, match=r"d.jsonl:1: objects\[1\].box: box .* outside the 100x50 image"):
        dataset[0]
