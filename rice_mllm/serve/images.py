"""Where a request's images may come from: `data:` URLs always; files only under `--image-root` (never outside it,
through `..`, absolute paths or symlinks); `http(s)://` only with `--allow-remote-images`. Every image is size-checked
from its header before a pixel is decoded (decompression bombs). Each refusal is an ApiError naming the message part.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..inference import MAX_IMAGE_PIXELS, ImageReadError, read_image
from .errors import ApiError

SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")
DATA_URL = re.compile(r"^data:(?P<type>[^;,]*)(?P<params>(;[^;,]*)*),(?P<data>.*)$", re.DOTALL)


@dataclass(frozen=True)
class ImagePolicy:
    """What the server may read.

    Args:
        image_root: folder that file paths and `file://` URLs are resolved in; None refuses them all.
        allow_remote: fetch `http(s)://` URLs (the server then makes requests on its clients' behalf: only for
            trusted clients, as it can reach whatever the server's network can).
        max_pixels: larger images are refused from their header, before decoding.
        max_remote_bytes: a remote image's download is cut off (and refused) past this size.
        remote_timeout: seconds for a remote fetch.
    """

    image_root: Path | None = None
    allow_remote: bool = False
    max_pixels: int = MAX_IMAGE_PIXELS
    max_remote_bytes: int = 20 * 2**20
    remote_timeout: float = 10.0


def image_data_url(image: Image.Image, image_format: str = "PNG") -> str:
    """An image as a `data:` URL, the form every OpenAI-compatible server takes (PNG: lossless)."""
    buffer = io.BytesIO()
    image.save(buffer, image_format)
    return f"data:image/{image_format.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def load_image(url: str, policy: ImagePolicy, where: str) -> Image.Image:
    """The RGB image an `image_url` points to, or ApiError (400) naming `where` (e.g. "messages[1].content[0]")."""
    scheme = match.group(1).lower() if (match := SCHEME.match(url)) else ""
    if scheme == "data":
        return _decode(_data_url_bytes(url, where), where, policy)
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            raise ApiError(
                400,
                f"{where}: remote image URLs are refused (the server runs without "
                "--allow-remote-images); send the image as a data: URL",
                where,
                "remote_image_refused",
            )
        return _decode(_fetch(url, policy, where), where, policy)
    if scheme == "file":
        parsed = urllib.parse.urlsplit(url)
        if parsed.netloc not in ("", "localhost"):
            raise ApiError(400, f"{where}: file URLs must name a local file (file:///path)", where, "invalid_image_url")
        return _read_local(urllib.parse.unquote(parsed.path), policy, where)
    if scheme and len(scheme) > 1:  # one letter is a Windows drive ("C:\..."), read as a path
        raise ApiError(
            400, f"{where}: unsupported image URL scheme {scheme!r}; use a data: URL", where, "invalid_image_url"
        )
    return _read_local(url, policy, where)


def _decode(source: bytes | Path, where: str, policy: ImagePolicy) -> Image.Image:
    source = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        return read_image(source, f"the image in {where}", policy.max_pixels)
    except ImageReadError as error:
        raise ApiError(400, str(error), where, "invalid_image") from None


def _data_url_bytes(url: str, where: str) -> bytes:
    match = DATA_URL.match(url)
    if match is None:
        raise ApiError(
            400, f"{where}: malformed data: URL (expected data:image/...;base64,...)", where, "invalid_image_url"
        )
    media_type, params = match.group("type").strip().lower(), match.group("params").lower().split(";")
    if not media_type.startswith("image/"):
        raise ApiError(
            400, f"{where}: the data: URL holds {media_type or 'text/plain'!r}, not an image", where, "invalid_image"
        )
    if "base64" not in params:
        raise ApiError(400, f"{where}: image data: URLs must be base64-encoded", where, "invalid_image_url")
    try:
        return base64.b64decode(match.group("data"), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where}: the data: URL is not valid base64", where, "invalid_image_url") from None


def _read_local(path: str, policy: ImagePolicy, where: str) -> Image.Image:
    if policy.image_root is None:
        raise ApiError(
            400,
            f"{where}: local image paths are refused (the server runs without --image-root); send "
            "the image as a data: URL",
            where,
            "local_image_refused",
        )
    root = policy.image_root.resolve()
    # resolve() follows every symlink and `..`: what is left must lie inside the root. The check comes before any
    # existence test, so a refusal says nothing about files outside the root.
    try:
        target = (root / path).resolve()
        inside, found = target.is_relative_to(root), target.is_file()
    except (OSError, ValueError, RuntimeError):  # a NUL byte, a name too long, a symlink loop (RuntimeError < 3.13)
        raise ApiError(400, f"{where}: {path!r} is not a usable path", where, "invalid_image_url") from None
    if not inside:
        raise ApiError(400, f"{where}: {path!r} lies outside the server's image root", where, "image_outside_root")
    if not found:
        raise ApiError(400, f"{where}: no such image under the image root: {path!r}", where, "image_not_found")
    return _decode(target, where, policy)


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only (urllib would also follow one to ftp://)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, "redirect to a non-http(s) URL refused", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch(url: str, policy: ImagePolicy, where: str) -> bytes:
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    try:
        with opener.open(
            urllib.request.Request(url, headers={"User-Agent": "rice_mllm"}), timeout=policy.remote_timeout
        ) as reply:
            data = reply.read(policy.max_remote_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise ApiError(400, f"{where}: could not fetch the image: {error}", where, "image_fetch_failed") from None
    if len(data) > policy.max_remote_bytes:
        raise ApiError(400, f"{where}: the image is over {policy.max_remote_bytes:,} bytes", where, "image_too_large")
    return data
