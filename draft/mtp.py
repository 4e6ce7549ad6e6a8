"""MTP-1: a DeepSeek-V3-style multi-token-prediction module used with γ = 1 (the production
baseline of the paper).

As in DeepSeek-V3, the module's input at the anchor x_p combines the target's last hidden state
at p-1 with the anchor's embedding: M [RMSNorm(h_{p-1}); RMSNorm(Emb(x_p))], followed by one
transformer block and the shared LM head. Where V3's block attends causally over its own
earlier inputs, ours attends over the target's last-layer states at earlier positions injected
as K/V (the DSpark backbone's mechanism, with one layer and a block of one), which lets it reuse
the same context cache, trainer and checkpoint format.
"""

from dataclasses import dataclass

import torch
from torch import nn

from draft.base import TargetHandle
from draft.dspark import DSparkConfig, DSparkModel
from engine.model import Linear, RMSNorm


@dataclass(frozen=True, slots=True)
class MTPConfig(DSparkConfig):
    kind: str = "mtp"
    num_layers: int = 1
    target_layers: tuple[int, ...] = (29,)  # the target's last layer
    block_size: int = 1
    head: str = "none"


class MTPModel(DSparkModel):
    uses_prev_features = True

    def __init__(self, cfg: MTPConfig, target: TargetHandle) -> None:
        assert cfg.head == "none" and len(cfg.target_layers) == 1
        super().__init__(cfg, target)
        h = cfg.hidden_size
        self.emb_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.prev_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.in_proj = Linear(2 * h, h, bias=False)
        nn.init.normal_(self.in_proj.weight, std=0.02)

    @property
    def max_draft_tokens(self) -> int:
        return self.config.block_size

    def block_inputs(self, anchor_ids, block, prev_features=None):
        assert prev_features is not None
        emb = self.emb_norm(self.target.embed_tokens(anchor_ids).to(self.in_proj.weight.dtype))
        prev = self.prev_norm(prev_features.to(self.in_proj.weight.dtype))
        x = self.in_proj(torch.cat([prev, emb], dim=-1))[:, None]  # [N, 1, h]
        if block > 1:
            x = torch.cat([x, self.mask_embedding.expand(x.shape[0], block - 1, -1)], dim=1)
        return x
