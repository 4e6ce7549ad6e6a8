"""`dspark serve --tensor-parallel-size 2` end to end: the real default model over two CPU ranks
(gloo), as users start it, streaming the same greedy replies as the single-rank server."""

from collections.abc import Iterator

import httpx
import pytest

from server.process import ServerProcess
from tests.server.test_integration import CONVERSATIONS, MAX_TOKENS, MODEL, _stream_text

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tp_server(tmp_path_factory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("tp-server") / "server.log"
    proc = ServerProcess(["--device", "cpu", "--dtype", "float32", "--tensor-parallel-size", "2",
                          "--num-threads", "1", "--kv-cache-bytes", str(128 << 20)], log)
    try:
        yield proc.wait_healthy()
    finally:
        proc.terminate()


def test_streams_what_one_rank_serves(tp_server, real_server):
    with httpx.Client(base_url=tp_server.url, timeout=300) as tp, \
            httpx.Client(base_url=real_server.url, timeout=300) as one:
        for messages in CONVERSATIONS:
            body = {"model": MODEL, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
            streamed = _stream_text(tp, "/v1/chat/completions", body)
            whole = tp.post("/v1/chat/completions", json=body).json()
            reference = one.post("/v1/chat/completions", json=body).json()
            assert streamed[0] == whole["choices"][0]["message"]["content"]
            assert streamed[0] == reference["choices"][0]["message"]["content"]
            assert streamed[1]["completion_tokens"] == reference["usage"]["completion_tokens"]
    assert "tensor parallel: 2 ranks over gloo" in tp_server.log()


def test_terminate_stops_every_rank(tp_server):
    """Last in this file: it stops the module's server (the fixture's own terminate is then a no-op)."""
    import psutil

    children = psutil.Process(tp_server.proc.pid).children(recursive=True)
    assert children, "the second rank runs as a child process"
    assert tp_server.terminate(timeout=60) is not None
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
