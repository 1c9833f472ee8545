"""Build the tiny world's byte-level BPE tokenizer (Qwen2-style pre-tokenization, Qwen2.5 special tokens, ChatML).

Regenerates rice_mllm/presets/tokenizers/tiny/{tokenizer.json,tokenizer_config.json} from the synthetic generator's
text plus a little general English; the output is a pure function of this file and the generator (BPE training in
`tokenizers` breaks ties deterministically), so the shipped files are reproducible.
Usage (repo root, kit installed or PYTHONPATH=.): python scripts/build_tiny_tokenizer.py [--out DIR] [--vocab-size N]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from rice_mllm.constants import DEFAULT_SYSTEM_PROMPT, IMAGE_TOKEN
from rice_mllm.data.synthetic import SPLITS, build_split
from rice_mllm.mllm.boxes import BOX_END, BOX_START, fill_regions

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "rice_mllm" / "presets" / "tokenizers" / "tiny"
VOCAB_SIZE = 1024
NUM_SCENES = 2000  # enough text that every template, word and number is seen many times
# Two-image records in the corpus, fixed here rather than following the generator's training mix: BPE merges in
# order of pair counts, so a change of mix reshuffled the ids (generator 10 doubled the pairs: same 712 tokens, 210
# ids moved), and stage 0, whose OCR classes are token ids, trains a different encoder on different ids.
CORPUS_TWO_IMAGE_FRACTION = 0.1
MODEL_MAX_LENGTH = 4096

# Ids 0..5, in Qwen2.5's order for the first three; `<image>` is the LLaVA placeholder the processor expands; then
# Qwen2.5's box delimiters (special there too, so a box is 2 special tokens and its digits and punctuation).
PAD_TOKEN, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END, IMAGE_TOKEN, BOX_START, BOX_END]

# Qwen2's pre-tokenizer split (from its tokenizer.json): contractions, letter runs with one leading non-letter,
# single digits, punctuation runs, newline runs and whitespace. Bytes are then mapped GPT-2 style.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2.5's ChatML. String or list content (parts {"type": "image"} -> "<image>\n", {"type": "text", "text": ...}),
# so [image, text] renders exactly like the LLaVA string "<image>\n" + text. `generation` marks what is supervised:
# assistant replies and their <|im_end|> (DESIGN.md section 5).
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part.type == 'image' -%}{{- '" + IMAGE_TOKEN + "\\n' -}}"
    "{%- elif part.type == 'text' -%}{{- part.text -}}"
    "{%- else -%}{{- raise_exception('unknown content part type: ' ~ part.type) -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages[0].role != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message.role + '\\n' -}}"
    "{%- if message.role == 'assistant' -%}"
    "{%- generation -%}{{- render(message.content) + '<|im_end|>' -}}{%- endgeneration -%}{{- '\\n' -}}"
    "{%- else -%}{{- render(message.content) + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# A little plain English (written for this kit) so that greetings, refusals and follow-ups tokenize sensibly.
GENERAL_ENGLISH = """\
Hello! How can I help you today?
Sure, here is a short answer. Let me know if you need more detail.
I am sorry, but I cannot see an image in this message. Please attach one.
Yes. No. Maybe. I do not know. Thank you! You are welcome.
The quick brown fox jumps over the lazy dog while the small cat sleeps in the warm sun.
Please describe what you see, then answer the question with one word.
There are two objects on the left side and one object on the right side of the picture.
What is your name? What time is it? Where are we going? Why is the sky blue?
The model looks at the picture, reads the text, and counts every shape it can find.
A photo of a city street with cars, people, trees and tall buildings under a cloudy sky.
First, open the file. Second, read each line. Finally, write the result to a new file.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 20 50 100 1000; fractions like 1/2 and 3.5 percent.
Punctuation (brackets), [lists], {sets}, "quotes", 'apostrophes', semi-colons; colons: dashes - and slashes /.
It's fine, we'll see, they're here, I've done it, you'd like it, I'm ready.
Good morning. Good evening. Good night. See you tomorrow, and have a nice day.
Could you tell me more about this picture? What do you think it shows?
I think the answer is correct, but let me check it again to be sure.
The weather is cold in winter and hot in summer; spring and autumn are mild.
My friend has a red bicycle, a green backpack and a small black dog named Max.
We walked along the river, crossed the old bridge and stopped at a quiet cafe.
She wrote a long letter to her mother and sent it by post on Monday morning.
Water boils at one hundred degrees and freezes at zero degrees Celsius.
The train leaves at nine o'clock, so we should arrive at the station early.
He likes to read books about history, science, music, art and travel.
This image shows a table with a cup of coffee, a plate of bread and a glass of water.
Write a short story about a child who finds a key in the garden.
Translate this sentence into French, German or Spanish if you can.
Summarize the text in two sentences and list the most important facts.
The answer depends on the question: please be more specific about what you want.
Children play football in the park after school while their parents talk.
Every week the team meets to plan new work, review results and fix problems.
Computers store numbers, letters, pictures and sounds as sequences of bits.
The kitchen is next to the living room, and the bedroom is upstairs on the right.
Apples, bananas, oranges and grapes are fruits; carrots and potatoes are vegetables.
Is this correct? Can you explain why? Which one is better, and how do you know?
Above, below, between, behind, in front of, next to, inside, outside, near, far.
Big, small, long, short, tall, wide, round, flat, bright, dark, light, heavy.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday are the days of the week.
"""


ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def corpus() -> Iterator[str]:
    """Training text in a fixed order: general English, then the world's messages as ChatML shows them to BPE.

    Special tokens are cut out before BPE sees text, so a message reaches it as "role\ncontent"; `<region>`
    placeholders are filled with box texts, as the processor renders them.
    """
    yield from GENERAL_ENGLISH.splitlines()
    records = build_split(seed=0, split=SPLITS[0], num_images=NUM_SCENES, two_image_fraction=CORPUS_TWO_IMAGE_FRACTION)
    sizes = {path: (scene.height, scene.width) for path, scene in zip(records.image_paths, records.scenes, strict=True)}
    for record in records.captions + records.qa:
        yield f"system\n{DEFAULT_SYSTEM_PROMPT}"  # the template adds it to every conversation
        messages = [{"content": message["value"], "from": message["from"]} for message in record["conversations"]]
        if record.get("regions"):
            messages = fill_regions(messages, record["regions"], [sizes[record["image"]]])
        for message in messages:
            yield f"{ROLES[message['from']]}\n{message['content']}"


def train_tokenizer(vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train the byte-level BPE on `corpus()`.

    Args:
        vocab_size: total size including the 256 byte symbols and the special tokens.

    Returns:
        The tokenizer; special tokens take ids 0..5 in SPECIAL_TOKENS order.
    """
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes, nothing is unknown
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    return tokenizer


def tokenizer_config() -> dict:
    """transformers' tokenizer_config.json: Qwen2.5-Instruct's special-token roles, ChatML template."""
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "extra_special_tokens": [IM_START, IM_END, IMAGE_TOKEN, BOX_START, BOX_END],
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "split_special_tokens": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "chat_template": CHAT_TEMPLATE,
    }


def build(out_dir: Path = DEFAULT_OUT, vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train and write tokenizer.json and tokenizer_config.json into `out_dir`; returns the tokenizer."""
    tokenizer = train_tokenizer(vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n", encoding="utf-8")
    return tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = parser.parse_args(argv)
    tokenizer = build(args.out, args.vocab_size)
    print(f"wrote a {tokenizer.get_vocab_size()}-token tokenizer to {args.out}")


if __name__ == "__main__":
    main()
