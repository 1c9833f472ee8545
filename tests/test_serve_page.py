"""The chat page in a real browser: headless Chromium (Debian's `chromium` package, or $CHROMIUM) driven by Playwright
attaches a picture, asks, and sees the reply stream in, equal to `inference.answer`; a pasted image and a second turn;
"New chat" forgets the conversation. A screenshot is saved. No Chromium is a failure, not a skip (.ci/run installs it).
"""

import os
import shutil

import pytest
from playwright.sync_api import sync_playwright

from rice_mllm.inference import answer, load_for_inference
from rice_mllm.serve.app import ServeOptions, create_app
from rice_mllm.serve.cli import serving
from rice_mllm.serve.images import image_data_url
from tests.fixtures import noise_image, save_tiny_kit

TOKENS = 12
PASTE = """async (url) => {
    const blob = await (await fetch(url)).blob();
    const data = new DataTransfer();
    data.items.add(new File([blob], "pasted.png", { type: "image/png" }));
    document.dispatchEvent(new ClipboardEvent("paste", { clipboardData: data, bubbles: true }));
}"""


def _chromium() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("no Chromium: `apt-get install chromium` (Debian) or set CHROMIUM=/path/to/chrome")
    return path


def _ask(page, text: str) -> tuple[str, int]:
    """Type and send `text`; wait for the streamed reply. Returns its text and how many pieces it came in."""
    page.fill("#prompt", text)
    page.click("#send")
    reply = page.locator(".message.assistant").last
    reply.and_(page.locator("[data-done]")).wait_for(timeout=60_000)
    assert reply.get_attribute("data-done") == "true", reply.inner_text()
    return reply.locator(".text").inner_text(), int(reply.get_attribute("data-chunks"))


def test_page_sends_pictures_and_streams_the_answer(tmp_path):
    executable = _chromium()
    model, processor = load_for_inference(save_tiny_kit(tmp_path / "kit"), "cpu")
    a, b = noise_image(40, 60, 1), noise_image(70, 30, 2)
    a.save(tmp_path / "a.png")
    first = [{"role": "user", "content": "<image>\nWhat is here?"}]
    reply_1 = answer(model, processor, first, [a], TOKENS)
    second = [*first, {"role": "assistant", "content": reply_1}, {"role": "user", "content": "<image>\nAnd this?"}]
    reply_2 = answer(model, processor, second, [a, b], TOKENS)
    reply_3 = answer(model, processor, [{"role": "user", "content": "And this?"}], [], TOKENS)
    assert len({reply_1, reply_2, reply_3}) == 3

    app = create_app(model, processor, ServeOptions(model_name="tiny-kit", max_tokens=TOKENS))
    with serving(app) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 700})
            page.goto(url)
            page.wait_for_function("document.getElementById('model').textContent === 'tiny-kit'")
            page.set_input_files("#file", str(tmp_path / "a.png"))
            page.locator("#attachments img").wait_for()
            text, pieces = _ask(page, "What is here?")
            assert text == reply_1 and pieces >= 2  # streamed: the reply arrived in several pieces
            page.evaluate(PASTE, image_data_url(b))
            page.locator("#attachments img").wait_for()
            assert _ask(page, "And this?")[0] == reply_2
            assert page.locator(".message.user img").count() == 2
            page.screenshot(path=str(tmp_path / "serve_page.png"), full_page=True)
            page.click("#new-chat")
            assert page.locator(".message").count() == 0
            assert _ask(page, "And this?")[0] == reply_3
        finally:
            browser.close()
    assert (tmp_path / "serve_page.png").stat().st_size > 10_000
