"""The physical batch: all tokens of all scheduled requests flattened into one forward."""

from dataclasses import dataclass

import torch

from scheduler import SchedulerOutput


@dataclass(slots=True)
class FlatBatch:
    """Flat token tensors plus the metadata that says which token belongs to which request.

    Request r owns tokens cu_seqlens_q[r]:cu_seqlens_q[r+1]; after this step its KV holds
    seq_lens[r] tokens, stored in the blocks of block_tables[r].
    """

    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    slot_mapping: torch.Tensor  # [num_tokens] int64, KV slot = block * block_size + offset
    cu_seqlens_q: torch.Tensor  # [num_reqs + 1] int32
    cu_seqlens_k: torch.Tensor  # [num_reqs + 1] int32
    seq_lens: torch.Tensor  # [num_reqs] int32
    block_tables: torch.Tensor  # [num_reqs, max_num_blocks] int32, padded with 0
    logits_indices: torch.Tensor  # [num_sampled] int64, flat index of each sampled token
    # Host copies, so backends can plan without device syncs.
    query_lens: list[int]
    context_lens: list[int]  # tokens already in the KV cache before this step
    sampled_req_indices: list[int]  # which requests own the rows of logits_indices
    block_size: int

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_reqs(self) -> int:
        return len(self.query_lens)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens, default=0)

    @property
    def max_seq_len(self) -> int:
        return max((c + q for c, q in zip(self.context_lens, self.query_lens)), default=0)

    @classmethod
    def build(cls, sched_out: SchedulerOutput, block_size: int, device: torch.device) -> "FlatBatch":
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        logits_indices: list[int] = []
        sampled: list[int] = []
        for r, s in enumerate(sched_out.scheduled):
            n = s.num_tokens
            input_ids.extend(s.token_ids)
            table = s.block_table
            for pos in range(s.start_pos, s.start_pos + n):
                positions.append(pos)
                slots.append(table[pos // block_size] * block_size + pos % block_size)
            query_lens.append(n)
            context_lens.append(s.start_pos)
            if s.sample:
                logits_indices.append(len(input_ids) - 1)
                sampled.append(r)
        seq_lens = [c + q for c, q in zip(context_lens, query_lens)]
        max_blocks = max((len(s.block_table) for s in sched_out.scheduled), default=0)
        tables = [s.block_table + [0] * (max_blocks - len(s.block_table)) for s in sched_out.scheduled]

        def cumsum(xs: list[int]) -> list[int]:
            out = [0]
            for x in xs:
                out.append(out[-1] + x)
            return out

        def t(xs: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(xs, dtype=dtype).to(device, non_blocking=True)

        return cls(
            input_ids=t(input_ids, torch.long),
            positions=t(positions, torch.long),
            slot_mapping=t(slots, torch.long),
            cu_seqlens_q=t(cumsum(query_lens), torch.int32),
            cu_seqlens_k=t(cumsum(seq_lens), torch.int32),
            seq_lens=t(seq_lens, torch.int32),
            block_tables=t(tables, torch.int32).reshape(len(tables), max_blocks),
            logits_indices=t(logits_indices, torch.long),
            query_lens=query_lens,
            context_lens=context_lens,
            sampled_req_indices=sampled,
            block_size=block_size,
        )
