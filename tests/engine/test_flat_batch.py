"""Flat-batch metadata: mixed prefill chunks, decodes and verifies in one forward."""

import torch

from engine.flat_batch import FlatBatch
from scheduler import SamplingParams, ScheduledRequest, SchedulerOutput


def scheduled(req_id: str, token_ids: list[int], start: int, table: list[int], num_draft: int = 0,
              sample: bool = True) -> ScheduledRequest:
    return ScheduledRequest(req_id, token_ids, start, table, SamplingParams(), sample, 0, num_draft)


def test_vllm_worked_example_per_request_draft_lengths():
    # vLLM's rejection-sampler example: draft lengths [3, 0, 2, 0, 1], each request decoding
    drafts = [3, 0, 2, 0, 1]
    out = SchedulerOutput([scheduled(f"r{i}", list(range(1 + n)), 10, [i], n) for i, n in enumerate(drafts)])
    b = FlatBatch.build(out, block_size=16, device=torch.device("cpu"))
    assert b.cu_num_logits == [0, 4, 5, 8, 9, 11]
    assert b.logits_indices.tolist() == list(range(11))
    assert b.target_logits_indices == [0, 1, 2, 5, 6, 9]
    assert b.bonus_logits_indices == [3, 4, 7, 8, 10]
    assert b.num_draft_tokens == drafts


def test_mixed_prefill_chunk_decode_and_verify():
    out = SchedulerOutput([
        scheduled("prefill-chunk", [1, 2, 3, 4, 5], 0, [7, 8], sample=False),  # not the last chunk
        scheduled("decode", [9], 20, [0, 1, 2, 3, 4, 6]),
        scheduled("verify", [4, 5, 6], 3, [2, 5], num_draft=2),
        scheduled("last-chunk", [6, 7], 5, [3, 4]),
    ])
    b = FlatBatch.build(out, block_size=4, device=torch.device("cpu"))
    assert b.input_ids.tolist() == [1, 2, 3, 4, 5, 9, 4, 5, 6, 6, 7]
    assert b.positions.tolist() == [0, 1, 2, 3, 4, 20, 3, 4, 5, 5, 6]
    # slot = block_table[pos // 4] * 4 + pos % 4
    assert b.slot_mapping.tolist() == [28, 29, 30, 31, 32, 24, 11, 20, 21, 17, 18]
    assert b.cu_seqlens_q.tolist() == [0, 5, 6, 9, 11]
    assert b.seq_lens.tolist() == [5, 21, 6, 7]
    assert b.cu_seqlens_k.tolist() == [0, 5, 26, 32, 39]
    assert b.block_tables.tolist() == [[7, 8, 0, 0, 0, 0], [0, 1, 2, 3, 4, 6], [2, 5, 0, 0, 0, 0],
                                       [3, 4, 0, 0, 0, 0]]
    assert b.sampled_req_indices == [1, 2, 3]
    assert b.logits_indices.tolist() == [5, 6, 7, 8, 10]
    assert b.target_logits_indices == [1, 2] and b.bonus_logits_indices == [0, 3, 4]
