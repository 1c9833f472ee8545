"""Parquet shards: conversation and region shards give the samples of the files they came from, bad rows are named by
shard and row, ranks and workers read disjoint rows, and training on shards equals training on JSON and resumes."""

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from rice_mllm.data.__main__ import main as data_main
from rice_mllm.data.conversation_shards import TURN, ConversationShards, write_conversation_shards
from rice_mllm.data.dataset import ConversationDataset
from rice_mllm.data.shards import IMAGE_CELL, ShardFormatError, ShardRows, ShardWriter
from rice_mllm.data.sources import CorruptImageError, load_conversations, open_images
from rice_mllm.pretrain.clusters import main as clusters_main
from rice_mllm.pretrain.region_data import RegionDataError, RegionDataset, check_region_file, collate_regions
from rice_mllm.pretrain.region_data import main as region_main
from rice_mllm.train import data_order
from rice_mllm.train.trainer import main
from tests.test_data import GEOMETRY_FLAGS, QWEN_DIR, qwen_processor, save_png, turn

ROOT = Path(__file__).resolve().parents[1]
CONVERSATION_SCHEMA = pa.schema([("image", IMAGE_CELL), ("conversations", pa.list_(TURN))])


@pytest.fixture(scope="module")
def processor():
    return qwen_processor()


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def _llava_file(tmp_path: Path) -> Path:
    save_png(tmp_path / "imgs" / "a.png", size=(90, 30))
    save_png(tmp_path / "imgs" / "b.png", size=(40, 60), color=(10, 200, 10))
    records = [
        {"id": "0", "image": "imgs/a.png", "conversations": [turn("human", "<image>\nwhat?"), turn("gpt", "a box")]},
        {"id": "1", "conversations": [turn("human", "hello"), turn("gpt", "hi")], "question_type": "chat"},
        {
            "id": "2",
            "image": ["imgs/a.png", "imgs/b.png"],
            "conversations": [turn("system", "Be brief."), turn("human", "<image><image>same?"), turn("gpt", "no")],
        },
        {"id": "3", "image": "imgs/b.png", "conversations": [turn("human", "<image>colour?"), turn("gpt", "green")]},
        {"id": "4", "image": "imgs/b.png", "conversations": [turn("user", "<image>shape?"), turn("assistant", "box")]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    return tmp_path / "data.json"


def test_conversation_shards_give_the_records_and_samples_of_their_json(tmp_path, processor):
    data = _llava_file(tmp_path)
    shards = tmp_path / "shards"
    args = ["to-shards", str(data), "--out", str(shards), "--rows-per-shard", "2", "--rows-per-group", "1"]
    assert data_main(args) == 0
    assert [f.name for f in sorted(shards.iterdir())] == [f"shard-0000{i}.parquet" for i in range(3)]
    with pytest.raises(FileExistsError, match="already holds Parquet shards"):  # never mixed with older shards
        data_main(args)
    meta = pq.read_metadata(shards / "shard-00000.parquet")  # no min/max of image bytes swelling the footer
    assert not any(meta.row_group(0).column(c).is_stats_set for c in range(meta.num_columns))
    from_json, from_shards = load_conversations(data), ConversationShards(shards)
    assert len(from_shards) == len(from_json) == 5
    for a, b in zip(from_json, from_shards, strict=True):
        assert (a.messages, a.metadata) == (b.messages, b.metadata)
        assert [np.asarray(i).tolist() for i in open_images(a)] == [np.asarray(i).tolist() for i in open_images(b)]
    assert from_shards[3].location == f"{shards / 'shard-00001.parquet'} row 1"
    json_set, shard_set = ConversationDataset(from_json, processor), ConversationDataset(from_shards, processor)
    assert shard_set.lengths() == json_set.lengths()  # from the bytes' headers, as from the files'
    for i in range(len(json_set)):
        expected, got = json_set[i], shard_set[i]
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    # datasets reads them as images (the feature metadata), as it reads LLaVA-OneVision's parquet files
    loaded = datasets.load_dataset("parquet", data_files=str(shards / "*.parquet"), split="train")
    assert loaded[2]["image"][1].size == (40, 60) and loaded[1]["question_type"] == "chat"


def test_conversation_shards_keep_regions(tmp_path, processor):
    save_png(tmp_path / "a.png", size=(90, 30))
    grounded = [turn("human", "<image>\nWhere is the box?"), turn("gpt", "<region>")]
    records = [
        {"id": "0", "image": "a.png", "regions": [[0, 0, 90, 30]], "conversations": grounded},
        {"id": "1", "conversations": [turn("human", "hello"), turn("gpt", "hi")]},
        {"id": "2", "image": "a.png", "regions": [[4.5, 3, 60, 29.5]], "conversations": grounded},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    assert data_main(["to-shards", str(tmp_path / "data.json"), "--out", str(tmp_path / "shards")]) == 0
    from_json, from_shards = load_conversations(tmp_path / "data.json"), ConversationShards(tmp_path / "shards")
    assert [c.regions for c in from_shards] == [c.regions for c in from_json] == [r.get("regions", []) for r in records]
    assert [c.metadata for c in from_shards] == [{"id": "0"}, {"id": "1"}, {"id": "2"}]
    json_set, shard_set = ConversationDataset(from_json, processor), ConversationDataset(from_shards, processor)
    for i in range(len(records)):
        assert torch.equal(json_set[i]["input_ids"], shard_set[i]["input_ids"])
    box_start = processor.tokenizer.convert_tokens_to_ids("<|box_start|>")
    assert (shard_set[2]["input_ids"] == box_start).any()


def test_llava_onevision_layout_one_image_struct_or_bytes_per_row(tmp_path, processor):
    """The layout of lmms-lab/LLaVA-OneVision-Data: `image` one Image struct per row (null: text only)."""
    png = save_png(tmp_path / "imgs" / "a.png", size=(90, 30))
    conversations = [[turn("human", "<image>\nwhat?"), turn("gpt", "a box")], [turn("human", "hi"), turn("gpt", "yo")]]
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}],
            "data_source": datasets.Value("string"),
        }
    )
    rows = {"id": ["a", "b"], "image": [{"bytes": png, "path": "a.png"}, None], "conversations": conversations}
    datasets.Dataset.from_dict({**rows, "data_source": ["x", "y"]}, features=features).to_parquet(
        tmp_path / "ov.parquet"
    )
    first, text_only = ConversationShards(tmp_path / "ov.parquet")
    assert first.metadata == {"id": "a", "data_source": "x"} and text_only.images == []
    assert open_images(first)[0].size == (90, 30)
    assert ConversationDataset([first], processor)[0]["image_sizes"].tolist() == [[30, 90]]
    # to-shards rewrites such files (datasets writes images in 100-row groups) in small groups, rows unchanged
    assert (
        data_main(["to-shards", str(tmp_path / "ov.parquet"), "--out", str(tmp_path / "small"), "--rows-per-group=1"])
        == 0
    )
    assert pq.read_metadata(tmp_path / "small" / "shard-00000.parquet").num_row_groups == 2
    assert list(ShardRows(tmp_path / "small")) == list(ShardRows(tmp_path / "ov.parquet"))
    # a struct holding only a path (resolved against data.image_folder), and plain bytes
    with ShardWriter(tmp_path / "paths", CONVERSATION_SCHEMA) as writer:
        writer.write({"image": {"bytes": None, "path": "imgs/a.png"}, "conversations": conversations[0]})
    (by_path,) = ConversationShards(tmp_path / "paths", image_folder=tmp_path)
    assert by_path.images == [tmp_path / "imgs" / "a.png"]
    bytes_schema = pa.schema([("image", pa.binary()), CONVERSATION_SCHEMA.field("conversations")])
    with ShardWriter(tmp_path / "bytes", bytes_schema) as writer:
        writer.write({"image": png, "conversations": conversations[0]})
    assert open_images(ConversationShards(tmp_path / "bytes")[0])[0].size == (90, 30)


def test_bad_conversation_rows_are_named_by_shard_and_row(tmp_path, capsys, processor):
    data = _llava_file(tmp_path)
    write_conversation_shards(data, tmp_path / "good", rows_per_shard=3)
    png = (tmp_path / "imgs" / "a.png").read_bytes()
    good_turns = [turn("human", "<image>\nwhat?"), turn("gpt", "a box")]
    with ShardWriter(tmp_path / "bad", CONVERSATION_SCHEMA, rows_per_shard=2) as writer:
        writer.write({"image": {"bytes": png, "path": "a.png"}, "conversations": good_turns})
        writer.write({"image": {"bytes": png[:40], "path": "cut.png"}, "conversations": good_turns})
        writer.write({"image": {"bytes": png, "path": "a.png"}, "conversations": [turn("robot", "<image>")]})
        writer.write({"image": None, "conversations": good_turns})
    code = data_main(["check", str(tmp_path / "good"), str(tmp_path / "bad"), "--tokenizer", QWEN_DIR, *GEOMETRY_FLAGS])
    out = capsys.readouterr().out
    first, second = tmp_path / "bad" / "shard-00000.parquet", tmp_path / "bad" / "shard-00001.parquet"
    assert code == 1
    assert f"{first} row 1: corrupt image: image 0 cut.png: cannot decode" in out
    assert f"{second} row 0: bad record: {second} row 0: conversations[0].from is 'robot'" in out
    assert f"{second} row 1: placeholder mismatch: 1 <image> placeholder(s) but 0 image(s)" in out
    assert "checked 9 records with 7 images: 3 problem(s)" in out  # a record that does not parse shows no image
    with pytest.raises(CorruptImageError, match=rf"{first} row 1: image 0 cut.png: cannot decode"):
        ConversationDataset(ConversationShards(tmp_path / "bad"), processor)[1]
    # a damaged file and a file of another layout are refused by name before any row is read
    (tmp_path / "bad" / "shard-00002.parquet").write_bytes(first.read_bytes()[:100])
    with pytest.raises(ShardFormatError, match=r"shard-00002.parquet: not a readable Parquet file"):
        ConversationShards(tmp_path / "bad")
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "other.parquet")
    with pytest.raises(ShardFormatError, match=r"other.parquet: no column\(s\) \['conversations'\]"):
        ConversationShards(tmp_path / "other.parquet")


def _region_jsonl(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    lines = []
    for i, (width, height) in enumerate([(100, 50), (60, 80), (90, 90), (50, 100), (80, 40)]):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
        objects = [{"box": [j, j, j + 20, j + 30], "label": f"thing {j}", "cluster": j} for j in range(i + 1)]
        ocr = [{"box": [0, 0, 30, 10], "text": "hi", "tokens": [7, 8, 7]}] if i % 2 else []
        lines.append(json.dumps({"image": f"imgs/{i}.png", "objects": objects, "ocr": ocr, "source": "test"}))
    (tmp_path / "regions.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "regions.jsonl"


def test_region_shards_give_the_samples_of_their_jsonl(tmp_path):
    data = _region_jsonl(tmp_path)
    shards = tmp_path / "shards"
    args = ["to-shards", "--data", str(data), "--out", str(shards), "--rows-per-shard", "2", "--rows-per-group", "1"]
    assert region_main(args) == 0
    assert len(list(shards.iterdir())) == 3 and check_region_file(shards, require_labels=True) == []
    for patches in (None, 12):
        settings = dict(image_size=28, num_regions=3, max_tokens=2, seed=1, max_patches=patches, patch_size=14)
        from_jsonl, from_shards = RegionDataset(data, **settings), RegionDataset(shards, **settings)
        assert len(from_jsonl) == len(from_shards) == 5
        for epoch in (0, 1):
            from_jsonl.set_epoch(epoch)
            from_shards.set_epoch(epoch)
            for i in range(5):
                expected, got = from_jsonl[i], from_shards[i]
                assert all(torch.equal(expected[k], got[k]) for k in expected), (patches, epoch, i)


def test_bad_region_rows_are_named_by_shard_and_row(tmp_path, capsys):
    data = _region_jsonl(tmp_path)
    png = (tmp_path / "imgs" / "0.png").read_bytes()  # 100 x 50
    records = [json.loads(line) for line in data.read_text().splitlines()]
    schema = pa.schema([("image", IMAGE_CELL), ("regions", pa.string())])
    with ShardWriter(tmp_path / "bad", schema, rows_per_shard=2) as writer:
        for image, regions in [
            (png, records[0]),
            (b"not an image", records[0]),
            (png, {"objects": [{"box": [0, 0, 10, 80], "cluster": 0}]}),
            (png, {"objects": [{"box": [0, 0, 10, 10], "label": "x"}]}),
        ]:
            writer.write({"image": {"bytes": image, "path": "x.png"}, "regions": json.dumps(regions)})
    assert region_main(["check", "--require-labels", str(tmp_path / "bad")]) == 1
    out = capsys.readouterr().out
    first, second = tmp_path / "bad" / "shard-00000.parquet", tmp_path / "bad" / "shard-00001.parquet"
    assert f"{first} row 1: image: cannot open x.png" in out
    assert f"{second} row 0: objects[0].box: box [0, 0, 10, 80] outside the 100x50 image" in out
    assert f"{second} row 1: objects[0].cluster: missing" in out
    dataset = RegionDataset(tmp_path / "bad", image_size=28)
    dataset[0]
    with pytest.raises(RegionDataError, match=rf"{first} row 1: image: cannot open x.png"):
        dataset[1]
    with pytest.raises(RegionDataError, match=rf"{second} row 0: objects\[0\].box"):
        dataset[2]
    # the converters check first: a bad JSONL writes no shard; COCO boxes go to JSONL and shards in one command
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "imgs/0.png", "objects": [{"box": [0, 0, 500, 5]}]}) + "\n")
    with pytest.raises(RegionDataError, match=r"bad.jsonl:1: objects\[0\].box"):
        region_main(["to-shards", "--data", str(bad), "--out", str(tmp_path / "none")])
    assert not (tmp_path / "none").exists()
    coco = {
        "images": [{"id": 1, "file_name": "0.png", "width": 100, "height": 50}],
        "categories": [{"id": 1, "name": "c"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 30, 30]}],
    }
    (tmp_path / "inst.json").write_text(json.dumps(coco))
    coco_args = ["--instances", str(tmp_path / "inst.json"), "--images", str(tmp_path / "imgs")]
    out_args = ["--out", str(tmp_path / "coco.jsonl"), "--shards", str(tmp_path / "coco")]
    assert region_main(["convert-coco", *coco_args, *out_args]) == 0
    assert region_main(["check", str(tmp_path / "coco")]) == 0
    assert region_main(["check", "--require-labels", str(tmp_path / "coco")]) == 1
    assert f"{tmp_path / 'coco' / 'shard-00000.parquet'} row 0: objects[0].cluster" in capsys.readouterr().out


def test_two_ranks_and_two_workers_read_disjoint_rows_of_the_shards(tmp_path, monkeypatch):
    data = _region_jsonl(tmp_path)
    region_main(["to-shards", "--data", str(data), "--out", str(tmp_path / "shards"), "--rows-per-shard", "2"])
    rows = ShardRows(tmp_path / "shards", columns=["regions"])
    read = []
    for rank in range(2):
        monkeypatch.setattr(data_order, "world_size", lambda: 2)
        monkeypatch.setattr(data_order, "rank", lambda rank=rank: rank)
        read.append({rows.locate(i) for i in data_order.epoch_indices(len(rows), seed=3, epoch=1)})
    assert len(read[0]) == len(read[1]) == 2 and not read[0] & read[1]  # 5 rows: 2 each, the remainder dropped
    monkeypatch.undo()
    # DataLoader workers open their own file handles: two workers give the batches one process gives
    dataset = RegionDataset(tmp_path / "shards", image_size=28, num_regions=2)
    batches = [
        list(data_order.epoch_batches(dataset, collate_regions, None, 1, 1, seed=3, epoch=0, num_workers=workers))
        for workers in (0, 2)
    ]
    assert len(batches[0]) == 4 and all(all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(*batches, strict=True))


def _tiny_world_run(tmp_path: Path, recipe: str, run: str, data: str | Path, *extra: str) -> list[str]:
    world = tmp_path / "world"
    return [
        "--config",
        str(ROOT / "recipes" / f"{recipe}.yaml"),
        f"output_dir={tmp_path / run}",
        f"data.tiny_world={world}",
        "data.tiny_world_images=4",
        f"data.train_files=[{data}]",
        "optim.batch_size=2",
        "deepspeed=null",
        "logging_steps=1",
        *extra,
    ]


def test_stage1_on_conversation_shards_equals_its_json_and_resumes_mid_epoch(tmp_path):
    world = tmp_path / "world"
    settings = [
        "data.template=chatml",  # multi-turn QA records: LLaVA's plain template takes one caption each
        "data.group_by_length=true",
        "data.pack_max_tokens=4096",
        "optim.max_steps=4",
        "save_steps=2",
        "resume=auto",
    ]
    main(_tiny_world_run(tmp_path, "stage1_align", "json", world / "qa_train.json", *settings))
    write_conversation_shards(world / "qa_train.json", tmp_path / "shards", rows_per_shard=4, rows_per_group=2)
    args = _tiny_world_run(tmp_path, "stage1_align", "shards", tmp_path / "shards", *settings)
    main(args)
    expected, got = _losses(tmp_path / "json"), _losses(tmp_path / "shards")
    assert sorted(got) == [1, 2, 3, 4] and all(abs(got[s] - expected[s]) < 1e-6 for s in got), (got, expected)
    shutil.rmtree(tmp_path / "shards" / "checkpoint-4")  # as if killed after step 2's save: resume mid-epoch
    (tmp_path / "shards" / "metrics.jsonl").unlink()
    main(args)
    got = _losses(tmp_path / "shards")
    assert sorted(got) == [3, 4] and all(abs(got[s] - expected[s]) < 1e-4 for s in got), (got, expected)


def test_stage0_on_region_shards_equals_its_jsonl_and_a_teacher_on_shards_is_refused(tmp_path):
    world = tmp_path / "world"
    small = ["model.vision=rice-vit-tiny", "pretrain.embed_dim=16", "pretrain.num_regions=4", "optim.max_steps=2"]
    main(_tiny_world_run(tmp_path, "stage0_rice_pretrain", "jsonl", world / "regions_train.jsonl", *small))
    labelled = tmp_path / "jsonl" / "regions" / "regions_train.labelled.jsonl"
    region_main(["to-shards", "--data", str(labelled), "--out", str(tmp_path / "shards"), "--rows-per-shard", "3"])
    shards = tmp_path / "shards"
    main(_tiny_world_run(tmp_path, "stage0_rice_pretrain", "sharded", shards, *small, "pretrain.teacher=null"))
    expected, got = _losses(tmp_path / "jsonl"), _losses(tmp_path / "sharded")
    assert sorted(got) == [1, 2] and all(abs(got[s] - expected[s]) < 1e-6 for s in got), (got, expected)
    with pytest.raises(ValueError, match=r"labels a region JSONL, got shards .*to-shards --data labelled.jsonl"):
        main(_tiny_world_run(tmp_path, "stage0_rice_pretrain", "teacher", shards, *small))
    with pytest.raises(ValueError, match="label the JSONL they were written from"):
        clusters_main(
            ["--data", str(shards), "--out", str(tmp_path / "x"), "--teacher", "label-hash", "--num-clusters", "2"]
        )
