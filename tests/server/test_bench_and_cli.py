"""`dspark bench serve` end to end on the tiny model, and the CLI's flag derivation."""

import json
import subprocess
import sys
import time

import pytest

from bench import serve as bench_serve
from engine.config import CacheConfig, EngineConfig
from scheduler import SchedulerConfig
from server.cli import DEFAULT_SERVE_MAX_WAITING, build_parser, engine_config
from server.process import ServerProcess
from tests.server.conftest import API_KEY
from tests.server.helpers import REPO


def test_bench_serve_writes_json_and_png(tiny_server, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"turns": [f"question {i}?", "more"]})
                                 for i in range(5)))
    out = tmp_path / "result"
    code = bench_serve.main(["--url", tiny_server.url, "--api-key", API_KEY, "--prompts",
                             str(prompts), "--concurrency", "1,3", "--rounds", "2",
                             "--max-tokens", "6", "--out", str(out)])
    assert code == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert "--concurrency 1,3" in " ".join(report["argv"])
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 3]
    for level in report["levels"]:
        assert level["num_requests"] == 2 * level["concurrency"] and level["num_failed"] == 0
        assert level["aggregate_tok_s"] > 0 and level["median_per_user_tok_s"] > 0
        assert all(r["completion_tokens"] == 6 for r in level["requests"])
        assert level["avg_verify_tokens_per_request"] == 0.0  # no drafter: nothing verified
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_engine_flags_follow_engine_config(tiny_model_dir):
    parser = build_parser()
    args = parser.parse_args(["serve", "--model", str(tiny_model_dir), "--device", "cpu",
                              "--dtype", "float32", "--max-num-seqs", "3", "--max-waiting", "7",
                              "--block-size", "32", "--max-model-len", "256"])
    config = engine_config(args)
    assert config.scheduler == SchedulerConfig(max_num_seqs=3, max_waiting=7)
    assert config.cache == CacheConfig(block_size=32)
    assert config == EngineConfig(model=str(tiny_model_dir), device="cpu", dtype="float32",
                                  max_model_len=256, cache=config.cache,
                                  scheduler=config.scheduler)
    defaults = engine_config(parser.parse_args(["serve", "--device", "cpu", "--dtype", "float32"]))
    # a server bounds its queue; the offline engine (EngineConfig's default) does not
    assert defaults == EngineConfig(device="cpu", dtype="float32",
                                    scheduler=SchedulerConfig(max_waiting=DEFAULT_SERVE_MAX_WAITING))
    assert SchedulerConfig().max_waiting == 0 and DEFAULT_SERVE_MAX_WAITING == 512


def test_api_key_from_environment(monkeypatch):
    monkeypatch.setenv("DSPARK_API_KEY", "from-env")
    assert build_parser().parse_args(["serve"]).api_key == "from-env"


def test_generate_prints_a_reply(tiny_model_dir):
    r = subprocess.run([sys.executable, "-m", "server.cli", "generate", "hello", "--model",
                        str(tiny_model_dir), "--device", "cpu", "--dtype", "float32",
                        "--max-tokens", "5"], cwd=REPO, capture_output=True, timeout=120,
                       check=False)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.strip()


def test_serve_exits_when_the_model_cannot_load(tmp_path):
    r = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--port", "0", "--model",
                        str(tmp_path / "missing"), "--device", "cpu", "--dtype", "float32"],
                       cwd=REPO, capture_output=True, timeout=120, check=False)
    assert r.returncode == 1
    assert b"the model failed to load" in r.stderr


def test_bench_prompt_sets_are_interleaved():
    assert bench_serve.interleave([["a1", "a2", "a3"], ["b1"], ["c1", "c2"]]) == ["a1", "b1", "c1", "a2", "c2", "a3"]
    assert bench_serve.interleave([]) == []


def test_server_that_fails_to_load_is_reported_at_once(tmp_path):
    """A benchmark must not poll /health for minutes after the server died loading a model."""
    bad = tmp_path / "model"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    proc = ServerProcess(["--model", str(bad), "--device", "cpu"], tmp_path / "server.log")
    start = time.monotonic()
    with pytest.raises(ChildProcessError, match="did not become healthy"):
        proc.wait_healthy(timeout=240)
    assert time.monotonic() - start < 60 and proc.proc.poll() is not None


def _foreign_server():
    """An OpenAI-compatible server that is not ours: streams two-token answers, and its
    /metrics answers 501 (llama.cpp's without --metrics)."""
    import socket
    import threading

    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI()

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "peer", "object": "model"}]}

    @app.get("/metrics")
    def metrics():
        return JSONResponse({"error": {"message": "metrics disabled"}}, status_code=501)

    @app.post("/v1/chat/completions")
    def chat():
        def events():
            for word in ("hello", " world"):
                yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': word}}]})}\n\n"
                time.sleep(0.01)
            usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return server, f"http://127.0.0.1:{port}"


def test_interleaved_compare_takes_turns_with_the_same_requests(tiny_server, tmp_path, monkeypatch):
    """`bench compare --interleave`: each level runs as `rounds` passes of one round, the
    configurations in A B then B A order on the same requests; a configuration's level holds
    all its passes' requests."""
    import asyncio

    from bench import compare

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"turns": [f"question {i}?"]}) for i in range(9)))
    args = bench_serve.parse_args(["--api-key", API_KEY, "--prompts", str(prompts), "--concurrency", "1,3",
                                   "--rounds", "2", "--max-tokens", "3", "--no-warmup"])
    urls = {"a": tiny_server.url, "b": tiny_server.url + "/"}  # one server under two names
    calls = []
    measured = compare.measured_level

    async def recording(url, headers, bodies, concurrency, bar):
        calls.append(("a" if url == urls["a"] else "b", concurrency,
                      [b["messages"][0]["content"] for b in bodies]))
        return await measured(url, headers, bodies, concurrency, bar)

    monkeypatch.setattr(compare, "measured_level", recording)
    results = asyncio.run(compare.interleaved_sweeps(urls, args))
    assert [(name, c) for name, c, _ in calls] == [("a", 1), ("b", 1), ("b", 1), ("a", 1),
                                                   ("a", 3), ("b", 3), ("b", 3), ("a", 3)]
    assert all(calls[i][2] == calls[i + 1][2] for i in (0, 2, 4, 6))  # a pass: the same requests
    assert calls[0][2] != calls[2][2]
    for name in urls:
        assert [(lv.concurrency, lv.num_requests, lv.num_failed) for lv in results[name]] == [(1, 2, 0), (3, 6, 0)]
        assert all(lv.aggregate_tok_s > 0 and lv.avg_verify_tokens_per_request >= 0 for lv in results[name])


def test_bench_serve_works_against_a_server_without_our_metrics(tmp_path):
    server, url = _foreign_server()
    try:
        out = tmp_path / "peer-0.5ms"  # a dot in the stem stays in the file name
        code = bench_serve.main(["--url", url, "--concurrency", "1,2", "--rounds", "1",
                                 "--max-tokens", "2", "--out", str(out)])
        assert code == 0
        report = json.loads(out.with_name(out.name + ".json").read_text())
        for level in report["levels"]:
            assert level["num_failed"] == 0 and level["aggregate_tok_s"] > 0
            assert level["avg_verify_tokens_per_request"] != level["avg_verify_tokens_per_request"]  # NaN
    finally:
        server.should_exit = True


def test_peers_ratios_against_llama_cpp():
    from bench.peers import ratios
    from bench.serve import LevelResult

    def level(c, user, agg, ttft):
        return LevelResult(c, 1, 0, 1.0, agg, user, user, ttft, ttft, 0.01, 1.0, [])

    table = ratios({"llama.cpp": [level(1, 100.0, 100.0, 0.2), level(8, 20.0, 120.0, 1.0)],
                    "ours": [level(1, 90.0, 90.0, 0.1), level(8, 25.0, 180.0, 0.4)]})
    assert table["ours"]["1"] == {"per_user": 0.9, "aggregate": 0.9, "ttft_p50": 0.5}
    assert table["ours"]["8"]["aggregate"] == 1.5 and table["ours"]["8"]["ttft_p50"] == 0.4
