"""OpenAI chat-completions requests -> the kit's messages, image URLs and sampling settings; replies -> OpenAI bodies.

A message's content is a string or a list of `text` and `image_url` parts; each image part becomes one `<image>`
placeholder where it stands (parts joined by newlines), so the part order sets the image order, as in training data
(`<image>\\nquestion`). Anything the server cannot honour is refused with the parameter's name, never ignored.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from ..constants import IMAGE_TOKEN
from ..inference import template_marker_in
from .errors import ApiError

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP_STRINGS = 4  # as OpenAI
# Accepted and ignored: they change nothing here (bookkeeping fields), or hold the one value the server implements.
IGNORED = {"user", "metadata", "store", "service_tier", "stream_options", "parallel_tool_calls"}
NEUTRAL = {"n": 1, "frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "top_logprobs": None}
KNOWN = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed", "stream"}


@dataclass(frozen=True)
class Sampling:
    """Per-request generation settings. max_tokens None: the server's default (bounded by the context)."""

    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict[str, str]]  # the kit's messages, `<image>` where each image part stood
    image_urls: list[tuple[str, str]]  # (url, where in the request) in placeholder order
    sampling: Sampling
    stream: bool
    include_usage: bool


def _number(body: Mapping, key: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    above_low = isinstance(value, int | float) and (value > low if low_open else value >= low)  # NaN is neither
    if isinstance(value, bool) or not above_low or value > high:
        raise ApiError(400, f"{key} must be a number in {'(' if low_open else '['}{low}, {high}], got {value!r}", key)
    return float(value)


def _integer(body: Mapping, key: str, low: int) -> int | None:
    value = body.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
        raise ApiError(400, f"{key} must be an integer >= {low}, got {value!r}", key)
    return value


def parse_sampling(body: Mapping, default_temperature: float) -> Sampling:
    """Sampling settings of a request body (temperature defaults to the server's), checked as OpenAI checks them."""
    max_tokens = _integer(body, "max_tokens", 1)
    max_completion = _integer(body, "max_completion_tokens", 1)  # OpenAI's newer name for max_tokens
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise ApiError(400, "max_tokens and max_completion_tokens disagree; send one", "max_tokens")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"stop must be a non-empty string or a list of up to {MAX_STOP_STRINGS} of them", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64):
        raise ApiError(400, f"seed must be a 64-bit integer, got {seed!r}", "seed")
    return Sampling(
        max_tokens=max_tokens if max_tokens is not None else max_completion,
        temperature=_number(body, "temperature", default_temperature, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        stop=tuple(stop),
        seed=seed,
    )


def _content(message: Mapping, role: str, where: str, images: list[tuple[str, str]]) -> str:
    """A message's text with `<image>` for each image part (whose URL is appended to `images`)."""
    content = message.get("content")
    if isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif isinstance(content, list) and content:
        parts = content
    else:
        raise ApiError(400, f"{where}.content must be a string or a non-empty list of parts", f"{where}.content")
    pieces = []
    for index, part in enumerate(parts):
        at = f"{where}.content[{index}]"
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if marker := template_marker_in(part["text"]):
                raise ApiError(400, f"{at}: text cannot contain {marker!r}; send images as image_url parts", at)
            pieces.append(part["text"])
        elif kind == "image_url" and role == "user":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, Mapping) else image
            if not isinstance(url, str) or not url:
                raise ApiError(400, f"{at}: image_url must hold a url string", at)
            images.append((url, at))
            pieces.append(IMAGE_TOKEN)
        elif kind == "image_url":
            raise ApiError(400, f"{at}: only user messages may hold images", at)
        else:
            raise ApiError(400, f"{at}: parts must be {{'type': 'text', 'text': ...}} or image_url parts", at)
    return "\n".join(pieces)


def parse_chat_request(body: object, default_temperature: float, max_images: int) -> ChatRequest:
    """Check a decoded JSON body and turn it into a ChatRequest. Raises ApiError (400) naming the offending field."""
    if not isinstance(body, Mapping):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN - IGNORED - set(NEUTRAL))
    if unknown:
        raise ApiError(400, f"unrecognized request argument(s): {', '.join(unknown)}", unknown[0])
    for key, neutral in NEUTRAL.items():
        if body.get(key, neutral) not in (neutral, None):
            raise ApiError(400, f"{key}={body[key]!r} is not supported (only {neutral!r})", key)
    if not isinstance(body.get("model"), str):
        raise ApiError(400, "model is required: a string (GET /v1/models lists it)", "model")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "messages is required: a non-empty list", "messages")
    messages, images = [], []
    for index, message in enumerate(raw):
        where = f"messages[{index}]"
        role = ROLES.get(message.get("role")) if isinstance(message, Mapping) else None
        if role is None:
            raise ApiError(400, f"{where}.role must be one of {sorted(ROLES)}", f"{where}.role")
        messages.append({"role": role, "content": _content(message, role, where, images)})
        if len(images) > max_images:  # before any image is decoded
            raise ApiError(400, f"more than {max_images} images in one request", "messages", "too_many_images")
    stream = body.get("stream") or False
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, Mapping):
        raise ApiError(400, "stream must be a boolean and stream_options an object", "stream")
    return ChatRequest(
        model=body["model"],
        messages=messages,
        image_urls=images,
        sampling=parse_sampling(body, default_temperature),
        stream=stream,
        include_usage=bool(options.get("include_usage")),
    )


# --- response bodies ---


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(reply_id: str, model: str, text: str, finish_reason: str, counts: dict) -> dict:
    return {
        "id": reply_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": counts,
    }


def chunk_body(
    reply_id: str, model: str, delta: dict | None, finish_reason: str | None = None, counts: dict | None = None
) -> dict:
    """One SSE chunk; `delta` None gives the usage-only chunk (`choices: []`) of `stream_options.include_usage`."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    body = {"id": reply_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    body["choices"] = choices
    if counts is not None:
        body["usage"] = counts
    return body
