"""The chat page at / in a real headless browser (Debian's chromium, installed by .ci/run):
it streams a reply from the tiny model and shows its tokens/s and TTFT."""

import re

import httpx
import pytest

from server.app import create_app
from server.config import ServerConfig
from tests.server.browser import CHROMIUM, HeadlessPage
from tests.server.conftest import tiny_engine_config
from tests.server.helpers import ThreadedServer


@pytest.fixture(scope="module")
def open_server(tiny_model_dir):
    server = ThreadedServer(create_app(ServerConfig(engine=tiny_engine_config(tiny_model_dir)))).start()
    yield server
    server.stop()


def test_page_is_served_static_without_external_resources(open_server):
    r = httpx.get(open_server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert not re.search(r"(src|href)=\"https?://", r.text)  # no CDN


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_page_streams_a_reply_and_shows_tokens_per_second(open_server, tmp_path):
    page = HeadlessPage(open_server.url + "/?prompt=hello&max_tokens=24&temperature=0", tmp_path)
    try:
        status = page.wait_for("['done', 'error'].includes(status = document.getElementById('status')"
                               ".textContent) && status", timeout=60)
        reply = page.evaluate("document.querySelector('.msg.assistant').textContent")
        stats = page.evaluate("document.querySelector('.stats').textContent")
    finally:
        page.close()
    assert status == "done", stats
    expected = httpx.post(open_server.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hello"}], "max_tokens": 24, "temperature": 0}).json()
    assert reply == expected["choices"][0]["message"]["content"]  # the streamed reply, whole
    tokens = expected["usage"]["completion_tokens"]
    assert re.fullmatch(rf"TTFT \d+ ms · {tokens} tokens · [\d.]+ tok/s", stats), stats
