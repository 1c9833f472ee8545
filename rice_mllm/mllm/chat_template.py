"""Qwen2.5 ChatML rendering with assistant-only labels: the one template for training, chat and eval.

Text: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, Qwen2.5's default system turn first when the
conversation has none. Invariant: ids equal tokenizing the whole ChatML text; CHAT_TEMPLATE renders the same text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rice_mllm.constants import DEFAULT_SYSTEM_PROMPT, IGNORE_INDEX

ROLES = ("system", "user", "assistant")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# Jinja twin of `format_chat`, saved into tokenizer configs so that `apply_chat_template` and
# serving stacks render exactly what the kit trains on. Default system turn: "You are a helpful
# assistant.", as LLaVA-OneVision's Qwen template (and Qwen2) insert it; Qwen2.5-Instruct's own
# template says "You are Qwen, created by Alibaba Cloud. ..." instead, but the kit trains the
# LLaVA-OneVision way, and a user who wants Qwen's text passes it as the system message.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class ChatText:
    """Rendered ChatML text and the character spans [start, end) that carry the loss."""

    text: str
    supervised_spans: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class RenderedChat:
    """Token ids of a rendered conversation and their labels (IGNORE_INDEX where not supervised)."""

    input_ids: list[int]
    labels: list[int]


def format_chat(
    messages: Sequence[Mapping[str, str]],
    add_generation_prompt: bool = False,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
) -> ChatText:
    """Render messages as ChatML text, marking each assistant reply plus its `<|im_end|>` as supervised.

    The "\\n" after `<|im_end|>` is not supervised: generation stops at `<|im_end|>` (the eos), so the
    newline is never produced by the model; it belongs to the template, like the role headers.

    Args:
        messages: [{"role": "system"|"user"|"assistant", "content": str}, ...].
        add_generation_prompt: end with an open `<|im_start|>assistant\\n` for generation.
        system_prompt: system turn inserted when messages[0] is not a system message.
    """
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    length = 0

    def emit(piece: str, supervised: bool = False) -> None:
        nonlocal length
        if supervised:
            spans.append((length, length + len(piece)))
        parts.append(piece)
        length += len(piece)

    if not messages or messages[0].get("role") != "system":
        emit(f"{IM_START}system\n{system_prompt}{IM_END}\n")
    for index, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"message {index}: role {role!r} is not one of {ROLES}")
        if not isinstance(content, str):
            raise TypeError(f"message {index}: content must be a string, got {type(content).__name__}")
        for marker in (IM_START, IM_END):
            # A literal control token inside content would silently forge turns.
            if marker in content:
                raise ValueError(f"message {index} ({role}) contains the control token {marker!r}")
        emit(f"{IM_START}{role}\n")
        emit(content + IM_END, supervised=role == "assistant")
        emit("\n")
    if add_generation_prompt:
        emit(f"{IM_START}assistant\n")
    return ChatText("".join(parts), tuple(spans))


def render_chat(
    tokenizer,
    messages: Sequence[Mapping[str, str]],
    add_generation_prompt: bool = False,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
) -> RenderedChat:
    """Tokenize a conversation and label the assistant replies.

    The whole text is tokenized at once (so ids equal the ChatML text's tokenization exactly) and a
    token is supervised when its first character lies in a supervised span. A BPE token that straddles
    the header/reply border (e.g. "\\n\\n" when a reply starts with a newline) starts in the header and
    is therefore not supervised.

    Args:
        tokenizer: a fast (tokenizers-backed) Hugging Face tokenizer with ChatML special tokens.
        messages: see `format_chat`.
        add_generation_prompt: see `format_chat`.
        system_prompt: see `format_chat`.

    Returns:
        input_ids and labels, both of length T.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer: offsets are needed for exact labels")
    chat = format_chat(messages, add_generation_prompt, system_prompt)
    encoding = tokenizer(chat.text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    spans = iter(chat.supervised_spans)
    span = next(spans, None)
    for position, (start, _end) in enumerate(encoding["offset_mapping"]):
        # Offsets are increasing, so one pass over tokens and spans suffices.
        while span is not None and start >= span[1]:
            span = next(spans, None)
        if span is not None and span[0] <= start:
            labels[position] = ids[position]
    return RenderedChat(ids, labels)
