"""The kit's two templates, one renderer each for training, chat and eval: Qwen2.5 ChatML, and LLaVA's `plain`.

ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, Qwen2.5's default system turn first when the
conversation has none; assistant replies and their `<|im_end|>` supervised. Plain: LLaVA's alignment template (see
`format_plain`). Invariant: ids equal tokenizing the whole text; each template's Jinja twin renders the same text.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from rice_mllm.constants import DEFAULT_SYSTEM_PROMPT, IGNORE_INDEX, IMAGE_TOKEN

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
        role, content = _checked(index, message)
        emit(f"{IM_START}{role}\n")
        emit(content + IM_END, supervised=role == "assistant")
        emit("\n")
    if add_generation_prompt:
        emit(f"{IM_START}assistant\n")
    return ChatText("".join(parts), tuple(spans))


def _checked(index: int, message: Mapping[str, str]) -> tuple[str, str]:
    """(role, content) of a message, refused by name when the role is unknown or the content could forge a turn."""
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise ValueError(f"message {index}: role {role!r} is not one of {ROLES}")
    if not isinstance(content, str):
        raise TypeError(f"message {index}: content must be a string, got {type(content).__name__}")
    for marker in (IM_START, IM_END):
        # A literal control token inside content would silently forge turns.
        if marker in content:
            raise ValueError(f"message {index} ({role}) contains the control token {marker!r}")
    return role, content


# LLaVA's `conv_llava_plain.sep`: the "end signal" preprocess_plain appends to every caption.
PLAIN_SEPARATOR = "\n"
# Jinja twin of `format_plain` (for samples it accepts).
PLAIN_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{- '" + IMAGE_TOKEN + "' * message['content'].count('" + IMAGE_TOKEN + "') }}"
    "{%- elif message['role'] == 'assistant' %}{{- message['content'] + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
)


def format_plain(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> ChatText:
    """Render one image-caption pair with LLaVA's `plain` template, as LLaVA's alignment stage trains on it.

    LLaVA (1.5 and NeXT, `--version plain`) uses `conv_llava_plain` (no system text, empty roles, sep "\\n") through
    `preprocess_plain`: a sample must be exactly one human turn holding `<image>` and one reply; the human text is
    replaced by the bare `<image>` (the instruction is dropped); the text is `<image>` + reply + sep; every token
    after the image is supervised: the caption and the "\\n" that ends it (its "end signal": no EOS token is added,
    and Qwen's tokenizer adds no BOS). The kit renders the same text and labels, keeping every `<image>` of the user
    turn (LLaVA keeps one; one-image samples are identical). With `add_generation_prompt`, only the user turn is
    given and only its images are rendered: the model then writes a caption, and stops at no EOS it was taught.

    Raises:
        ValueError: the messages are not [user, assistant] ([user] with add_generation_prompt), or the user turn
            holds no `<image>` (preprocess_plain asserts both).
    """
    roles = [message.get("role") for message in messages]
    expected = ["user"] if add_generation_prompt else ["user", "assistant"]
    if roles != expected:
        raise ValueError(f"the plain template renders the turns {expected} (LLaVA's preprocess_plain), got {roles}")
    contents = [_checked(index, message)[1] for index, message in enumerate(messages)]
    images = IMAGE_TOKEN * contents[0].count(IMAGE_TOKEN)
    if not images:
        raise ValueError(f"the plain template needs an {IMAGE_TOKEN} in the user turn: it renders only the images")
    if add_generation_prompt:
        return ChatText(images, ())
    reply = contents[1] + PLAIN_SEPARATOR
    return ChatText(images + reply, ((len(images), len(images) + len(reply)),))


@dataclass(frozen=True)
class Template:
    """A way to render conversations: `format(messages, add_generation_prompt)` and its Jinja twin (saved into
    tokenizer configs so that `apply_chat_template` renders what the model was trained on)."""

    format: Callable[..., ChatText]
    jinja: str


TEMPLATES: dict[str, Template] = {
    "chatml": Template(format_chat, CHAT_TEMPLATE),
    "plain": Template(format_plain, PLAIN_TEMPLATE),
}
DEFAULT_TEMPLATE = "chatml"


def get_template(name: str) -> Template:
    """The template called `name`; an unknown name raises, listing the known ones."""
    if name not in TEMPLATES:
        raise KeyError(f"unknown template {name!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def render_chat(
    tokenizer,
    messages: Sequence[Mapping[str, str]],
    add_generation_prompt: bool = False,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
) -> RenderedChat:
    """Tokenize a conversation rendered as ChatML and label the assistant replies (see `tokenize_chat`).

    Args:
        tokenizer: a fast (tokenizers-backed) Hugging Face tokenizer with ChatML special tokens.
        messages: see `format_chat`.
        add_generation_prompt: see `format_chat`.
        system_prompt: see `format_chat`.

    Returns:
        input_ids and labels, both of length T.
    """
    return tokenize_chat(tokenizer, format_chat(messages, add_generation_prompt, system_prompt))


def tokenize_chat(tokenizer, chat: ChatText) -> RenderedChat:
    """Token ids of a rendered text, labelled where supervised.

    The whole text is tokenized at once (so ids equal the text's tokenization exactly) and a token is supervised
    when its first character lies in a supervised span. A BPE token that straddles the header/reply border (e.g.
    "\\n\\n" when a reply starts with a newline) starts in the header and is therefore not supervised.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer: offsets are needed for exact labels")
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
