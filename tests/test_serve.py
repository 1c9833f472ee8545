"""The OpenAI-compatible server through the official `openai` client: replies equal `inference.answer` streamed or
not (multi-image, multi-turn, image-part order), concurrent requests share one generate and each gets its reply
alone, a seed makes sampling reproducible in any batch, and the command line serves and refuses bad models."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import openai
import pytest

from rice_mllm.inference import answer, load_for_inference
from rice_mllm.serve.app import ServeOptions, create_app
from rice_mllm.serve.batching import select_batch
from rice_mllm.serve.cli import main, parse_args, serving
from rice_mllm.serve.images import image_data_url
from tests.fixtures import REPO_ROOT, noise_image, save_tiny_kit

NAME = "tiny-kit"
TOKENS = 6


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    checkpoint = save_tiny_kit(tmp_path_factory.mktemp("serve") / "kit")
    model, processor = load_for_inference(checkpoint, "cpu")
    images = [noise_image(40, 60, 1), noise_image(70, 30, 2), noise_image(20, 20, 3)]
    return checkpoint, model, processor, images


@pytest.fixture(scope="module")
def server(kit):
    """The server with a long batch window, so requests sent together are answered in one generate."""
    _, model, processor, _ = kit
    app = create_app(model, processor, ServeOptions(model_name=NAME, max_tokens=TOKENS, batch_wait_s=0.5))
    with serving(app) as url:
        yield url, app.state.batcher


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def _image(image) -> dict:
    return {"type": "image_url", "image_url": {"url": image_data_url(image)}}


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _streamed(client: openai.OpenAI, **request) -> tuple[str, str, object]:
    """Joined content, finish reason and usage of a streamed reply."""
    pieces, reason, counts = [], None, None
    for chunk in client.chat.completions.create(model=NAME, stream=True, **request):
        counts = chunk.usage or counts
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            reason = chunk.choices[0].finish_reason or reason
    return "".join(pieces), reason, counts


def test_replies_equal_answer_streamed_or_not_with_several_images_and_turns(kit, server):
    _, model, processor, (a, b, c) = kit
    url, _ = server
    client = _client(url)
    first = [{"role": "user", "content": "<image>\n<image>\nWhat is here?"}]
    reply_1 = answer(model, processor, first, [a, b], max_new_tokens=TOKENS)
    turns = [
        {"role": "system", "content": "You look closely."},
        *first,
        {"role": "assistant", "content": reply_1},
        {"role": "user", "content": "<image>\nAnd now?"},
    ]
    expected = answer(model, processor, turns, [a, b, c], max_new_tokens=TOKENS)
    blind = answer(model, processor, [{**m, "content": m["content"].replace("<image>\n", "")} for m in turns], [], 6)
    assert expected and expected != blind  # the images change the reply

    request = dict(
        messages=[
            {"role": "system", "content": "You look closely."},
            {"role": "user", "content": [_image(a), _image(b), _text("What is here?")]},
            {"role": "assistant", "content": reply_1},
            {"role": "user", "content": [_image(c), _text("And now?")]},
        ],
        max_tokens=TOKENS,
    )
    reply = client.chat.completions.create(model=NAME, **request)
    assert reply.choices[0].message.content == expected
    prompt_tokens = len(processor(turns, [a, b, c], add_generation_prompt=True)["input_ids"])
    assert reply.usage.prompt_tokens == prompt_tokens and reply.usage.completion_tokens >= 1
    assert reply.usage.total_tokens == prompt_tokens + reply.usage.completion_tokens
    text, reason, counts = _streamed(client, **request)
    assert (text, reason) == (expected, reply.choices[0].finish_reason)
    assert counts.model_dump() == reply.usage.model_dump()


def test_stream_is_openai_sse_ending_with_done(kit, server):
    url, _ = server
    body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 4}
    body["stream_options"] = {"include_usage": True}
    request = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = response.read().decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(event.startswith("data: ") for event in events[:-1])
    chunks = [json.loads(event[len("data: ") :]) for event in events[:-2]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0  # include_usage's chunk


def test_image_part_order_sets_the_placeholder_order(kit, server):
    _, model, processor, (a, b, _) = kit
    client = _client(server[0])
    question = [{"role": "user", "content": "<image>\nWhich differs?\n<image>"}]
    expected = [answer(model, processor, question, pair, max_new_tokens=TOKENS) for pair in ([a, b], [b, a])]
    assert expected[0] != expected[1]
    for (first, second), reply in zip([(a, b), (b, a)], expected, strict=True):
        parts = [_image(first), _text("Which differs?"), _image(second)]
        sent = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": parts}], max_tokens=6)
        assert sent.choices[0].message.content == reply


def _together(client: openai.OpenAI, requests: list[dict]) -> list:
    """Send every request at once, each from its own thread; the replies in request order."""
    replies = [None] * len(requests)

    def send(index: int) -> None:
        replies[index] = client.chat.completions.create(model=NAME, **requests[index])

    threads = [threading.Thread(target=send, args=(index,)) for index in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return replies


def test_concurrent_requests_share_one_generate_and_each_gets_its_reply_alone(kit, server):
    _, model, processor, (a, b, c) = kit
    url, batcher = server
    cases = [  # (text, images, max_tokens): different lengths, image counts and stopping points
        ("What is here?", [a], 6),
        ("Describe it.", [b, c], 3),
        ("Hello there, how are you?", [], 8),
        ("Count the colours.", [c], 5),
        ("Which one?", [a, b], 7),
    ]
    expected = [
        answer(model, processor, [{"role": "user", "content": "<image>\n" * len(images) + text}], images, tokens)
        for text, images, tokens in cases
    ]
    assert len(set(expected)) == len(expected)
    requests = [
        {"messages": [{"role": "user", "content": [*map(_image, images), _text(text)]}], "max_tokens": tokens}
        for text, images, tokens in cases
    ]
    # One more, cut by a stop string: the reply up to (not including) its first occurrence.
    full = expected[2]
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    requests.append({**requests[2], "stop": [stop, "never in the reply"]})
    expected.append(full[: full.index(stop)])

    before = sum(batcher.batch_sizes.values())
    replies = _together(_client(url), requests)
    assert [reply.choices[0].message.content for reply in replies] == expected
    reasons = [reply.choices[0].finish_reason for reply in replies]
    assert reasons[-1] == "stop" and all(reason in ("stop", "length") for reason in reasons)
    generates = sum(batcher.batch_sizes.values()) - before
    assert generates < len(requests), batcher.batch_sizes  # batched: fewer generates than requests


def test_a_stop_string_across_streamed_pieces_is_never_sent(kit, server):
    _, _, _, (a, _, _) = kit
    client = _client(server[0])
    request = {"messages": [{"role": "user", "content": [_image(a), _text("Go on.")]}], "max_tokens": 12}
    pieces = [c.choices[0].delta.content for c in client.chat.completions.create(model=NAME, stream=True, **request)]
    pieces = [piece for piece in pieces if piece]
    full = "".join(pieces)
    boundary = len(pieces[0]) + len(pieces[1])  # a stop string made of the end of one piece and the next's start
    stop = full[boundary - 1 : boundary + 1]
    assert full.index(stop) == boundary - 1
    text, reason, _ = _streamed(client, stop=stop, **request)
    assert (text, reason) == (full[: boundary - 1], "stop")


def test_batches_group_prompts_of_similar_length():
    assert select_batch([100, 30, 105, 700, 98], max_batch=3, max_padding=0.3) == [0, 2, 4]
    assert select_batch([100, 30, 105, 700, 98], max_batch=16, max_padding=0.3) == [0, 1, 2, 4]
    assert select_batch([100, 30, 105, 700, 98], max_batch=16, max_padding=1.0) == [0, 1, 2, 3, 4]
    assert select_batch([700, 30, 100], max_batch=16, max_padding=0.3) == [0]  # the oldest always goes


def test_seeded_sampling_gives_the_same_reply_alone_and_in_a_batch(kit, server):
    _, _, _, (a, _, _) = kit
    client = _client(server[0])
    sampled = {
        "messages": [{"role": "user", "content": [_image(a), _text("Tell me a story.")]}],
        "max_tokens": 8,
        "temperature": 1.0,
        "top_p": 0.9,
    }
    alone = {seed: client.chat.completions.create(model=NAME, seed=seed, **sampled) for seed in (1, 2, 3)}
    texts = {seed: reply.choices[0].message.content for seed, reply in alone.items()}
    assert len(set(texts.values())) > 1  # the seed matters
    greedy = {"messages": [{"role": "user", "content": "Hello?"}], "max_tokens": 8}
    batch = _together(client, [{**sampled, "seed": 1}, greedy, {**sampled, "seed": 3}, {**sampled, "seed": 2}])
    assert [batch[i].choices[0].message.content for i in (0, 2, 3)] == [texts[1], texts[3], texts[2]]


def test_models_and_health(server):
    url, _ = server
    assert [model.id for model in _client(url).models.list()] == [NAME]
    with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
        assert json.loads(response.read())["status"] == "ok"


def test_command_line_serves_a_checkpoint(kit, tmp_path):
    checkpoint = kit[0]
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # a free port, released for the server
    argv = [sys.executable, "-m", "rice_mllm.serve", "--model", str(checkpoint), "--port", str(port)]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1")
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as response:
                    assert json.loads(response.read())["data"][0]["id"] == str(checkpoint)
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
                time.sleep(0.2)
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert f"rice_mllm serve: {checkpoint} on cpu" in output


def test_the_api_key_may_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("RICE_MLLM_API_KEY", "sk-env")
    assert parse_args([]).api_key == "sk-env"
    assert parse_args(["--api-key", "sk-flag"]).api_key == "sk-flag"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "nowhere"], "no such checkpoint folder"),
        ([], "no tiny-world model at outputs/tiny-world/stage2_instruct"),
        (["--model", "KIT", "--image-root", "missing"], "--image-root missing is not a folder"),
    ],
)
def test_command_line_refuses_bad_models_in_one_line(kit, tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main([str(kit[0]) if arg == "KIT" else arg for arg in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
