"""Servers shared by the tests of this package: the tiny random model in a thread of this
process, and the real default model as a `dspark serve` process (slow tests only)."""

from collections.abc import Iterator

import httpx
import pytest

from engine.config import EngineConfig
from server.app import create_app
from server.config import ServerConfig
from tests.server.helpers import ServerProcess, ThreadedServer

API_KEY = "test-key"
TINY_MAX_REQUEST_BYTES = 64 * 1024


def tiny_engine_config(model_dir, **options) -> EngineConfig:
    return EngineConfig.from_options(model_dir, "cpu", "float32", **options)


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir) -> Iterator[ThreadedServer]:
    """Tiny model, API key required, a 64 KiB body limit."""
    config = ServerConfig(engine=tiny_engine_config(tiny_model_dir, max_num_seqs=8),
                          api_key=API_KEY, max_request_bytes=TINY_MAX_REQUEST_BYTES,
                          drain_timeout=5)
    server = ThreadedServer(create_app(config)).start()
    yield server
    server.stop()


@pytest.fixture
def tiny_client(tiny_server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=tiny_server.url, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        yield client


@pytest.fixture(scope="session")
def tiny_model_name(tiny_model_dir) -> str:
    return tiny_model_dir.name


@pytest.fixture(scope="session")
def real_server(tmp_path_factory) -> Iterator[ServerProcess]:
    """The real default model in fp32 (so greedy output matches `LLM().chat` in fp32), as a
    separate process started exactly as users start it: speculating with the shipped DSpark
    drafter, so those matches are lossless checks of the default serving path."""
    log = tmp_path_factory.mktemp("real-server") / "server.log"
    proc = ServerProcess(["--device", "cpu", "--dtype", "float32",
                          "--kv-cache-bytes", str(256 << 20), "--max-num-seqs", "64"], log)
    try:
        yield proc.wait_healthy()
    finally:
        proc.terminate()
