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
    # Flat indices of the tokens whose logits are needed: the last token of a request that
    # samples, and for a verifying request all of its 1 + ℓ_r tokens.
    logits_indices: torch.Tensor  # [num_logits] int64
    # Host copies, so backends can plan without device syncs.
    query_lens: list[int]
    context_lens: list[int]  # tokens already in the KV cache before this step
    sampled_req_indices: list[int]  # requests that sample, in order
    num_draft_tokens: list[int]  # ℓ_r of each sampling request; its logits rows are 1 + ℓ_r
    block_size: int

    @property
    def cu_num_logits(self) -> list[int]:
        """Row offsets of each sampling request in the logits: request i owns rows
        cu[i]:cu[i+1], the first ℓ_i verify its drafts and the last gives the bonus token."""
        out = [0]
        for n in self.num_draft_tokens:
            out.append(out[-1] + n + 1)
        return out

    @property
    def target_logits_indices(self) -> list[int]:
        """Logits rows that score draft tokens (vLLM's worked example: ℓ = [3, 0, 2, 0, 1]
        gives [0, 1, 2, 5, 6, 9])."""
        cu = self.cu_num_logits
        return [cu[i] + k for i, n in enumerate(self.num_draft_tokens) for k in range(n)]

    @property
    def bonus_logits_indices(self) -> list[int]:
        """Logits rows that give each request's bonus token ([3, 4, 7, 8, 10] in that example)."""
        return [c - 1 for c in self.cu_num_logits[1:]]

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
        num_draft: list[int] = []
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
                last = len(input_ids) - 1
                logits_indices.extend(range(last - s.num_draft_tokens, last + 1))
                sampled.append(r)
                num_draft.append(s.num_draft_tokens)
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
            num_draft_tokens=num_draft,
            block_size=block_size,
        )
