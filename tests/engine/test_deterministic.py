"""--deterministic: greedy (T = 0) token ids in bf16 are identical alone, inside a batch of mixed
requests, with speculation, and streamed or not, because no row's arithmetic depends on what
else shares its forward (engine/batch_invariance.py, TorchAttention's deterministic mode); and
prefill logits are bit-identical on one rank and on two (engine/tensor_parallel.py)."""

import asyncio
import json
import random
from collections.abc import Callable

import httpx
import pytest
import torch

from draft import NgramDrafter
from engine import LLM, InvalidRequest, SamplingParams
from engine.attention import masked_attention
from engine.batch_invariance import RowBounds, make_row_invariant, probe_bounds, probe_query_rows
from engine.config import ModelArchConfig
from engine.model import Linear
from tests.engine.test_default_model import CHATS
from tests.engine.test_engine import random_prompts
from tests.server.helpers import REPO, ServerProcess, parse_sse

GREEDY = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
EVAL = REPO.parent / "shared" / "data" / "prompts" / "eval" / "chat_mt_bench.jsonl"


def mixed_batch(prompts: list[list[int]], vocab: int, n: int = 32, seed: int = 0):
    """`prompts` greedy among n - len(prompts) sampled requests of other lengths."""
    rng = random.Random(seed)
    others = [[rng.randrange(3, vocab) for _ in range(rng.randrange(3, 300))] for _ in range(n - len(prompts))]
    params = [SamplingParams(max_tokens=rng.randrange(8, 160), temperature=1.0, seed=i, ignore_eos=True)
              for i in range(len(others))]
    return prompts + others, [GREEDY] * len(prompts) + params


class _KernelSwitch(Linear):
    """A projection whose kernel rounds its own way for some call sizes (as oneDNN's do)."""

    def __init__(self, odd: Callable[[int], bool]) -> None:
        super().__init__(24, 16, bias=False, dtype=torch.bfloat16)
        self.odd = odd

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        # row by row, so that only `odd` (not the machine's own kernels) depends on the call size
        y = torch.cat([super(_KernelSwitch, self)._forward(row) for row in x.split(1)])
        return y + 1 if self.odd(x.shape[0]) else y


@pytest.mark.parametrize(("odd", "bounds"), [
    (lambda rows: False, RowBounds(1, 64)),
    (lambda rows: rows == 1, RowBounds(2, 64)),  # pad single rows
    (lambda rows: rows > 8, RowBounds(1, 8)),  # cut longer calls
    (lambda rows: rows == 1 or rows > 16, RowBounds(2, 16)),
    (lambda rows: rows == 3, RowBounds(1, 2)),
])
def test_the_probe_bounds_calls_to_the_sizes_that_reproduce_single_rows(odd, bounds):
    lin = _KernelSwitch(odd)
    assert probe_bounds(lin, torch.Generator().manual_seed(0)) == bounds
    lin.min_rows, lin.max_rows = bounds.min_rows, bounds.max_rows
    x = torch.randn(100, 24).bfloat16()
    alone = torch.cat([lin(x[i:i + 1]) for i in range(100)])
    for rows in (1, 2, 3, 7, 9, 17, 64, 100):
        assert torch.equal(lin(x[:rows]), alone[:rows])


def test_the_real_kernels_reproduce_single_rows_at_every_call_size(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), "cpu", "bfloat16")
    make_row_invariant(llm.engine.model)
    for lin in {(m.in_features, m.out_features): m for m in llm.engine.model.modules()
                if isinstance(m, Linear)}.values():
        x = torch.randn(200, lin.in_features).bfloat16()
        alone = torch.cat([lin(x[i:i + 1]) for i in range(200)])
        for rows in (2, 3, 5, 8, 13, 32, 33, 64, 65, 200):
            assert torch.equal(torch.cat([lin(part) for part in x.split(rows)]), alone)


def test_attention_padded_to_the_probed_rows_reproduces_a_query_row_in_any_call():
    arch = ModelArchConfig(arch="llama", vocab_size=8, hidden_size=48, intermediate_size=8, num_layers=1,
                           num_heads=4, num_kv_heads=2, head_dim=16)
    min_rows = probe_query_rows(arch, torch.bfloat16, torch.device("cpu"))
    assert min_rows in (2, 4, 8, 16, 32)
    k, v = torch.randn(6, 1024, 2, 16).bfloat16(), torch.randn(6, 1024, 2, 16).bfloat16()
    query = torch.randn(6, 4, 16).bfloat16()
    mask = (torch.arange(1024) < torch.tensor([5, 600, 1024, 90, 513, 300])[:, None])[:, None, None]

    def attend(rows: int) -> torch.Tensor:
        q = torch.randn(6, 4, rows, 16).bfloat16()
        q[:, :, rows - 1] = query
        return masked_attention(q, k, v, mask.expand(6, 1, rows, 1024), 0.25)[:, :, rows - 1]

    reference = attend(min_rows)
    assert all(torch.equal(attend(rows), reference) for rows in range(min_rows, 33))


def test_tiny_model_bf16_greedy_is_batch_and_speculation_invariant(tiny_model_dir):
    options = {"device": "cpu", "dtype": "bfloat16", "deterministic": True, "block_size": 4}
    llm = LLM(str(tiny_model_dir), **options)
    prompts = [p * 2 for p in random_prompts(8, seed=4)]
    alone = [llm.generate([p], GREEDY)[0].token_ids for p in prompts]
    batch_prompts, params = mixed_batch(prompts, 259)
    batched = [o.token_ids for o in llm.generate(batch_prompts, params)[:8]]
    assert batched == alone
    spec = LLM(str(tiny_model_dir), drafter=NgramDrafter(4), **options)
    assert [o.token_ids for o in spec.generate(prompts, GREEDY)] == alone


def test_deterministic_refuses_what_it_cannot_keep(tiny_model_dir):
    with pytest.raises(InvalidRequest, match="deterministic"):
        LLM(str(tiny_model_dir), "cpu", "bfloat16", deterministic=True, quantization="int4")
    with pytest.raises(InvalidRequest, match="--tp-invariant extends --deterministic"):
        LLM(str(tiny_model_dir), "cpu", "bfloat16", tp_invariant=True)


@pytest.fixture(scope="module")
def chat_prompts() -> list[list[dict]]:
    rows = [json.loads(line) for line in EVAL.read_text().splitlines()[:8]]
    return [[{"role": "user", "content": r["turns"][0]}] for r in rows]


@pytest.mark.slow
def test_default_model_bf16_greedy_is_identical_everywhere(chat_prompts, tmp_path):
    """Issue 18's check: 8 chat prompts x 128 tokens at T = 0 in bf16 give the same token ids
    (a) alone, (b) inside a batch of 32 mixed requests, (c) with DSpark speculation, and
    (d) streamed and not from a `dspark serve --deterministic` (which speculates with DSpark)."""
    llm = LLM(device="cpu", dtype="bfloat16", deterministic=True)
    prompts = [llm.tokenizer.encode_chat(m) for m in chat_prompts]
    alone = [llm.generate([p], GREEDY)[0].token_ids for p in prompts]
    batch_prompts, params = mixed_batch(prompts, llm.tokenizer.vocab_size)
    assert [o.token_ids for o in llm.generate(batch_prompts, params)[:8]] == alone  # (b)
    spec = LLM(device="cpu", dtype="bfloat16", deterministic=True, draft="dspark", num_draft_tokens=7)
    outs = spec.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == alone  # (c)
    texts = [llm.tokenizer.decode(a) for a in alone]
    server = ServerProcess(["--device", "cpu", "--dtype", "bfloat16", "--deterministic"],
                           tmp_path / "server.log").wait_healthy()
    try:
        streamed, whole = asyncio.run(streamed_and_whole(server.url, chat_prompts))  # (d), all at once
    finally:
        server.terminate()
    assert streamed == texts
    assert whole == texts


async def streamed_and_whole(url: str, chats: list[list[dict]]) -> tuple[list[str], list[str]]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        async def one(messages: list[dict], stream: bool) -> str:
            body = {"messages": messages, "max_tokens": 128, "temperature": 0, "ignore_eos": True,
                    "stream": stream}
            if not stream:
                return (await client.post("/v1/chat/completions", json=body)).json()["choices"][0]["message"]["content"]
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                events, done = parse_sse([line async for line in r.aiter_lines()])
            assert done
            return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))

        results = await asyncio.gather(*(one(m, s) for s in (True, False) for m in chats))
    return results[:len(chats)], results[len(chats):]


@pytest.mark.slow
def test_deterministic_prefill_logits_are_one_ranks_bit_for_bit():
    """--deterministic --tp-invariant sums the row-parallel projections in one fixed order on
    any number of ranks (`FixedOrderSum`), so two ranks give one rank's logits exactly, not
    within 1e-4."""
    logits = []
    for tp in (2, 1):  # one tensor-parallel engine per process at a time
        llm = LLM(dtype="float32", device="cpu", tensor_parallel_size=tp, deterministic=True, tp_invariant=True)
        ids = llm.encode_chat([{"role": "user", "content": CHATS[0]}])
        logits.append(llm.engine.prompt_logits(ids))
        llm.engine.close()
    assert torch.equal(*logits)
