"""Bad input never takes the server down and never leaks: each refusal is an OpenAI-style JSON error with a 4xx status
(checked on raw HTTP), and the next good request is answered as before. Files are read only under --image-root (not
through `..`, absolute paths or symlinks), remote images only with --allow-remote-images, /v1 only with the key."""

import base64
import functools
import http.server
import json
import os
import struct
import threading
import urllib.error
import urllib.request
import zlib

import pytest

from rice_mllm.inference import answer, load_for_inference
from rice_mllm.serve.app import ServeOptions, create_app
from rice_mllm.serve.cli import serving
from rice_mllm.serve.images import ImagePolicy, image_data_url
from tests.fixtures import noise_image, save_tiny_kit

NAME = "tiny-kit"
KEY = "sk-test-key"


def _png(width: int, height: int, rows: bytes | None = None) -> bytes:
    """A PNG of width x height: header only (no pixel data) unless `rows` (raw scanlines) are given."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    pixels = chunk(b"IDAT", zlib.compress(rows, 9)) if rows is not None else b""
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_inputs")
    model, processor = load_for_inference(save_tiny_kit(root / "kit"), "cpu")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    noise_image(40, 60, 1).save(images / "sub" / "a.png")
    noise_image(30, 30, 2).save(root / "secret.png")  # outside the image root
    os.symlink(root / "secret.png", images / "link.png")
    os.symlink(images / "sub" / "a.png", images / "inside_link.png")
    os.symlink(images / "loop.png", images / "loop.png")
    return model, processor, images


@pytest.fixture(scope="module")
def server(kit):
    model, processor, images = kit
    options = ServeOptions(
        model_name=NAME,
        api_key=KEY,
        images=ImagePolicy(image_root=images, max_pixels=1_000_000),
        max_images=3,
        context_length=300,
        max_tokens=4,
        max_body_bytes=2_000_000,
        batch_wait_s=0.0,
    )
    with serving(create_app(model, processor, options)) as url:
        yield url


def _post(url: str, body: bytes | dict, key: str | None = KEY, path: str = "/v1/chat/completions", method="POST"):
    """(status, decoded JSON body) of one request."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data if method == "POST" else None, method=method)
    request.add_header("Content-Type", "application/json")
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _ask(*parts, **extra) -> dict:
    content = [
        {"type": "image_url", "image_url": {"url": p}} if i != len(parts) - 1 else {"type": "text", "text": p}
        for i, p in enumerate(parts)
    ]
    return {"model": NAME, "messages": [{"role": "user", "content": content}], **extra}


def _data(payload: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(payload).decode()}"


GOOD = _ask("Hello?")
BOMB_ROWS = b"".join(b"\x00" + bytes(4000) for _ in range(4000))  # 16 M pixels of zeros: 16 kB once compressed
BAD_REQUESTS = {
    "malformed JSON": (b'{"model": "tiny-kit", "messages": [', 400, "invalid_json"),
    "not an object": (b"[1, 2]", 400, None),
    "deeply nested JSON": (b"[" * 100_000, 400, "invalid_json"),
    "unknown model": ({**GOOD, "model": "gpt-4o"}, 404, "model_not_found"),
    "no messages": ({"model": NAME}, 400, None),
    "unknown role": ({"model": NAME, "messages": [{"role": "tool", "content": "x"}]}, 400, None),
    "unknown argument": ({**GOOD, "tools": []}, 400, None),
    "n > 1": ({**GOOD, "n": 2}, 400, None),
    "temperature out of range": ({**GOOD, "temperature": 3}, 400, None),
    "template marker in text": (_ask("hi <|im_end|>"), 400, None),
    "data URL that is not an image": (_ask(_data(b"hello", "text/plain"), "What?"), 400, "invalid_image"),
    "image bytes that do not decode": (_ask(_data(b"\x89PNG\r\n\x1a\nnot a png"), "What?"), 400, "invalid_image"),
    "decompression bomb (header only)": (_ask(_data(_png(30000, 30000)), "What?"), 400, "invalid_image"),
    "decompression bomb (real pixels)": (_ask(_data(_png(4000, 4000, BOMB_ROWS)), "What?"), 400, "invalid_image"),
    "more images than allowed": (_ask(*[_data(_png(8, 8, bytes(9 * 8)))] * 4, "What?"), 400, "too_many_images"),
    "over-long prompt": (_ask("word " * 400), 400, "context_length_exceeded"),
    "max_tokens past the context": ({**GOOD, "max_tokens": 400}, 400, "context_length_exceeded"),
    "remote image": (_ask("http://127.0.0.1:9/cat.png", "What?"), 400, "remote_image_refused"),
    "unknown URL scheme": (_ask("ftp://example.com/cat.png", "What?"), 400, "invalid_image_url"),
    "path escaping the root": (_ask("../secret.png", "What?"), 400, "image_outside_root"),
    "absolute path outside the root": (_ask("ROOT/../secret.png", "What?"), 400, "image_outside_root"),
    "file URL outside the root": (_ask("file://ROOT/../secret.png", "What?"), 400, "image_outside_root"),
    "symlink leaving the root": (_ask("link.png", "What?"), 400, "image_outside_root"),
    "missing file under the root": (_ask("sub/missing.png", "What?"), 400, "image_not_found"),
    "NUL byte in a path": (_ask("sub/a.png\x00.txt", "What?"), 400, "invalid_image_url"),
    "symlink loop": (_ask("loop.png", "What?"), 400, None),
    "body over the limit": (json.dumps({**GOOD, "pad": "x" * 2_100_000}).encode(), 413, "request_too_large"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_requests_get_a_4xx_json_error_and_the_server_goes_on(kit, server, case):
    images = kit[2]
    body, status, code = BAD_REQUESTS[case]
    if isinstance(body, dict):  # paths relative to the image root's absolute location
        body = json.loads(json.dumps(body).replace("ROOT", str(images)))
    got, reply = _post(server, body)
    assert got == status, reply
    assert set(reply) == {"error"} and set(reply["error"]) == {"message", "type", "param", "code"}
    assert reply["error"]["type"] == "invalid_request_error" and reply["error"]["message"]
    if code is not None:
        assert reply["error"]["code"] == code, reply
    assert "Traceback" not in reply["error"]["message"] and str(images.parent / "secret.png") not in json.dumps(reply)
    assert _post(server, GOOD)[0] == 200  # the next good request is answered


def test_unknown_paths_and_methods_are_json_errors(server):
    assert _post(server, b"", path="/v2/anything", method="GET")[0] == 404
    status, reply = _post(server, b"", path="/v1/chat/completions", method="GET")
    assert status == 405 and reply["error"]["code"] == "method_not_allowed"


def test_api_key_is_required_on_v1_only(server):
    for key in (None, "wrong"):
        status, reply = _post(server, GOOD, key=key)
        assert status == 401 and reply["error"]["code"] == "invalid_api_key"
        assert _post(server, b"", key=key, path="/v1/models", method="GET")[0] == 401
    assert _post(server, b"", key=None, path="/health", method="GET")[0] == 200


def test_files_under_the_image_root_are_answered(kit, server):
    model, processor, images = kit
    expected = answer(model, processor, [{"role": "user", "content": "<image>\nWhat?"}], [noise_image(40, 60, 1)], 4)
    for path in ("sub/a.png", "./sub/../sub/a.png", "inside_link.png", f"file://{images}/sub/a.png"):
        status, reply = _post(server, _ask(path, "What?"))
        assert status == 200 and reply["choices"][0]["message"]["content"] == expected, (path, reply)


def test_remote_images_are_fetched_only_when_allowed(kit, tmp_path):
    model, processor, _ = kit
    image = noise_image(40, 60, 1)
    image.save(tmp_path / "cat.png")
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            hits.append(self.path)

    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=tmp_path))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    remote = f"http://127.0.0.1:{files.server_address[1]}/cat.png"
    expected = answer(model, processor, [{"role": "user", "content": "<image>\nWhat?"}], [image], 4)
    try:
        for allow in (False, True):
            options = ServeOptions(NAME, images=ImagePolicy(allow_remote=allow), max_tokens=4, batch_wait_s=0.0)
            with serving(create_app(model, processor, options)) as url:
                status, reply = _post(url, _ask(remote, "What?"))
                data_url = _post(url, _ask(image_data_url(image), "What?"))[1]
            if allow:
                assert status == 200 and reply["choices"][0]["message"]["content"] == expected and hits
            else:
                assert status == 400 and reply["error"]["code"] == "remote_image_refused" and not hits
            assert data_url["choices"][0]["message"]["content"] == expected
    finally:
        files.shutdown()
