"""Our model code against Hugging Face transformers on tiny random models of every family."""

import pytest
import torch

from engine import LLM, SamplingParams
from tests.conftest import make_tiny_model

PROMPTS = [[5, 70, 71, 72, 100, 101, 40], [9] * 3, list(range(30, 90))]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_logits_and_greedy_match_transformers(tmp_path, arch):
    import transformers

    path = make_tiny_model(tmp_path / arch, arch)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    llm = LLM(model=str(path), device="cpu", dtype="float32", block_size=4)
    for prompt in PROMPTS:
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0]
        ours = llm.engine.prompt_logits(prompt)
        assert (ours - ref).abs().max().item() < 1e-4
        with torch.no_grad():
            ref_ids = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        got = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
        assert got.token_ids == ref_ids
