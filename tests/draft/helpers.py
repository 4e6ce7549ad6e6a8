"""Tiny DSpark drafters around tiny random targets (shared by the draft tests)."""

import torch

from draft.dspark import DSparkConfig, DSparkModel
from engine import LLM


def tiny_llm(path, **options) -> LLM:
    return LLM(model=str(path), device="cpu", dtype="float32", **options)


def tiny_dspark(llm: LLM, kind: str = "dspark", head: str = "markov", seed: int = 0,
                block_size: int = 4, scale: float = 1.0, **overrides) -> DSparkModel:
    """A randomly initialised drafter for the tiny target, with a non-zero sequential head and
    confidence head (their trained-from-zero init would hide bugs)."""
    eng = llm.engine
    arch = eng.arch
    cfg = DSparkConfig(kind=kind, hidden_size=arch.hidden_size, vocab_size=arch.vocab_size,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=96,
                       max_positions=arch.max_position_embeddings, target_layers=(0, arch.num_layers - 1),
                       block_size=block_size, head=head, head_rank=8, **overrides)
    torch.manual_seed(seed)
    if kind == "eagle3":
        from draft.eagle3 import Eagle3Config, Eagle3Model

        cfg = Eagle3Config.from_json({**cfg.to_json(), "kind": "eagle3", "num_layers": 1, "head": "none"})
        model = Eagle3Model(cfg, eng._target_handle())
        with torch.no_grad():
            model.confidence.proj.weight.normal_(0, scale)
    elif kind == "mtp":
        from draft.mtp import MTPConfig, MTPModel

        cfg = MTPConfig.from_json({**cfg.to_json(), "kind": "mtp", "num_layers": 1, "block_size": 1,
                                   "head": "none", "target_layers": [arch.num_layers - 1]})
        model = MTPModel(cfg, eng._target_handle())
    else:
        model = DSparkModel(cfg, eng._target_handle())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("head.", "confidence.")):
                p.normal_(0, scale)
    return model.eval()


STANDALONE_BLOCK_SIZE = 4
_BLOCKS_PER_REQUEST = 32


def standalone(drafter):
    """A drafter used without an engine: its paged context gets a pool of its own."""
    drafter.bind_context(8 * _BLOCKS_PER_REQUEST, STANDALONE_BLOCK_SIZE)
    return drafter


def paged_input(req_id: str, *args, **kwargs):
    """A DraftInput whose request owns a block table of its own in a `standalone` pool (the
    same blocks for the same id; ids r0.., r and a.. map to disjoint ranges)."""
    from draft import DraftInput

    index = int(req_id[1:]) if req_id[1:].isdigit() else ord(req_id[0]) % 8
    first = (index % 8) * _BLOCKS_PER_REQUEST
    return DraftInput(req_id, *args, block_table=list(range(first, first + _BLOCKS_PER_REQUEST)), **kwargs)
