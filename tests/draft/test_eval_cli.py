"""`dspark draft eval` on a tiny target: the JSON outside checks read, plus table and plot."""

import json

from draft.checkpoint import save_drafter
from draft.cli import main
from tests.draft.helpers import tiny_dspark, tiny_llm


def test_eval_cli_reports_tau_per_dataset(tiny_model_dir, tmp_path):
    llm = tiny_llm(tiny_model_dir)
    save_drafter(tiny_dspark(llm, "dspark", "markov", block_size=3), tmp_path / "ck")
    files = []
    for name in ("math_a", "chat_b"):
        f = tmp_path / f"{name}.jsonl"
        f.write_text("".join(json.dumps({"turns": [f"question {i} of {name}", "more"]}) + "\n" for i in range(4)))
        files.append(str(f))
    out = tmp_path / "res" / "result.json"
    assert main(["eval", "--draft", str(tmp_path / "ck"), "--prompts", *files, "--num-draft-tokens", "3",
                 "--temperature", "1.0", "--max-prompts", "3", "--max-new-tokens", "10",
                 "--model", str(tiny_model_dir), "--dtype", "float32", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["datasets"]) == {"math_a", "chat_b"}
    for d in res["datasets"].values():
        assert 1.0 <= d["tau"] <= 4.0 and d["num_prompts"] == 3 and d["num_rounds"] > 0
        assert len(d["position_accept"]) == 3
    assert abs(res["macro_tau"] - sum(d["tau"] for d in res["datasets"].values()) / 2) < 1e-9
    assert out.with_suffix(".md").exists() and out.with_suffix(".png").exists()


def test_eval_resumes_after_an_interruption(tiny_model_dir, tmp_path, monkeypatch):
    import pytest

    from draft.training import evaluate as eval_mod
    from tests.draft.test_training import _InterruptAfter

    llm = tiny_llm(tiny_model_dir)
    save_drafter(tiny_dspark(llm, "dspark", "markov", block_size=3), tmp_path / "ck")
    f = tmp_path / "chat_a.jsonl"
    f.write_text("".join(json.dumps({"turns": [f"question {i}"]}) + "\n" for i in range(5)))
    cfg = eval_mod.EvalConfig(str(tmp_path / "ck"), (str(f),), 3, 1.0, 5, 10, str(tiny_model_dir),
                              "float32", 2, 0, str(tmp_path / "r.json"))
    monkeypatch.setattr(eval_mod, "tqdm", _InterruptAfter(3))
    with pytest.raises(KeyboardInterrupt):
        eval_mod.evaluate(cfg)
    partial = tmp_path / "r.partial.jsonl"
    assert len(partial.read_text().splitlines()) == 1 + 3  # the configuration, then 3 prompts
    monkeypatch.undo()
    calls = []
    from engine.llm_engine import LLMEngine

    add = LLMEngine.add_request

    def counting(self, *args, **kwargs):
        calls.append(1)
        return add(self, *args, **kwargs)

    monkeypatch.setattr(LLMEngine, "add_request", counting)
    res = eval_mod.evaluate(cfg)
    assert len(calls) == 2 and not partial.exists()  # only the two unfinished prompts ran
    assert res["datasets"]["chat_a"]["num_prompts"] == 5 and res["datasets"]["chat_a"]["num_rounds"] > 0
