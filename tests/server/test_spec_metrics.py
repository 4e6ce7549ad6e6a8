"""Speculation and error series on /metrics: per-step verify statistics from the engine and
error responses counted by status."""

import httpx
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_app
from server.config import ServerConfig
from tests.server.conftest import tiny_engine_config
from tests.server.helpers import ThreadedServer


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(values: dict, name: str, **labels) -> float:
    return sum(v for (n, lab), v in values.items()
               if n == name and all((k, str(x)) in lab for k, x in labels.items()))


def test_spec_series_and_error_counts(tiny_model_dir):
    config = ServerConfig(engine=tiny_engine_config(tiny_model_dir, draft="ngram", num_draft_tokens=3))
    server = ThreadedServer(create_app(config)).start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            text = "ab ab ab ab ab ab ab ab ab ab ab ab"  # repetitive: prompt lookup drafts
            for _ in range(3):
                r = client.post("/v1/completions", json={"prompt": text, "max_tokens": 24,
                                                          "temperature": 0})
                assert r.status_code == 200
            # (the random model's bytes are not all UTF-8: the text predicts only part of them)
            predicted = client.post("/v1/completions", json={
                "prompt": text, "max_tokens": 24, "temperature": 0,
                "prediction": {"type": "content", "content": r.json()["choices"][0]["text"]}}).json()
            assert client.post("/v1/completions", json={"prompt": text, "max_tokens": -1}).status_code == 400
            assert client.get("/v1/nope").status_code == 404
            values = samples(client.get("/metrics").text)
    finally:
        server.stop()
    verified = total(values, "dspark:spec_decode_num_verify_tokens_total")
    accepted = total(values, "dspark:spec_decode_num_accepted_tokens_total")
    assert verified > 0 and 0 <= accepted <= verified
    assert total(values, "dspark:spec_decode_num_draft_tokens_total") >= verified
    assert total(values, "dspark:spec_decode_verify_tokens_per_request_count") > 0
    assert total(values, "dspark:spec_decode_verify_time_seconds_count") > 0
    assert total(values, "dspark:spec_decode_draft_time_seconds_count") > 0
    assert total(values, "dspark:spec_decode_capacity_sum") == verified
    # per source: prompt lookup and the prediction, which add up to the whole
    by_source = {src: (total(values, "dspark:spec_decode_source_verify_tokens_total", source=src),
                       total(values, "dspark:spec_decode_source_accepted_tokens_total", source=src))
                 for src in ("ngram", "prediction")}
    assert by_source["ngram"][0] > 0 and by_source["prediction"][0] > 0
    assert sum(v for v, _ in by_source.values()) == verified
    assert sum(a for _, a in by_source.values()) == accepted
    details = predicted["usage"]["completion_tokens_details"]
    assert by_source["prediction"] == (details["accepted_prediction_tokens"] + details["rejected_prediction_tokens"],
                                       details["accepted_prediction_tokens"])
    assert total(values, "dspark:request_errors_total", status_code=400) == 1
    assert total(values, "dspark:request_errors_total", status_code=404) == 1
    assert total(values, "dspark:request_errors_total", status_code=500) == 0
