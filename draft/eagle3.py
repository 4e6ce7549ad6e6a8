"""EAGLE-3: a one-layer autoregressive drafter on fused low/mid/high target features, trained
with training-time test (TTT) over γ steps.

Input at position t: [RMSNorm(Emb(x_t)); RMSNorm(g_{t-1})] (2·hidden), where g_{t-1} is the
fused target feature fc([f_low; f_mid; f_high]) at t-1 for committed positions, and the drafter's
own output hidden state at t-1 for positions it drafted itself. One decoder layer (Q/K/V from
the 2·hidden input, residual from g) with causal attention, then a norm and the shared LM head:
the output at t predicts x_{t+1} and serves as g_t for the next step. At inference the layer's
K/V of committed positions are cached per request (only a projection: the layer has no layer
below it), and γ single-token steps draft left to right.

TTT: step j (1..γ) runs every position t as the j-th draft position of the chain anchored at
a = t-j+1. Its query sees step-1 keys of positions < a (true features) and the chain's own keys
(position a+i-1 from step i ≤ j); inputs use g from step j-1 at t-1 (true features at step 1).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from draft.base import DraftInput, LearnedDrafter, Proposal, TargetHandle
from draft.dspark import (
    DraftSampling,
    DSparkConfig,
    draft_vocab_head,
    register_draft_vocab,
    rotate,
    vocab_logits,
)
from draft.heads import ConfidenceHead, calibrated, calibration_terms
from engine.model import Linear, RMSNorm, RotaryEmbedding, prepack_linears


@dataclass(frozen=True, slots=True)
class Eagle3Config(DSparkConfig):
    kind: str = "eagle3"
    num_layers: int = 1
    target_layers: tuple[int, ...] = (1, 15, 29)  # low, mid, high
    head: str = "none"


class Eagle3Model(nn.Module):
    def __init__(self, cfg: Eagle3Config, target: TargetHandle) -> None:
        super().__init__()
        assert cfg.num_layers == 1 and cfg.head == "none"
        self.config = cfg
        self.target = target
        h = cfg.hidden_size
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.fc = Linear(len(cfg.target_layers) * h, h, bias=False)
        self.emb_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.q_proj = Linear(2 * h, self.nh * self.hd, bias=False)
        self.kv_proj = Linear(2 * h, 2 * self.nkv * self.hd, bias=False)
        self.o_proj = Linear(self.nh * self.hd, h, bias=False)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.gate_up_proj = Linear(h, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, h, bias=False)
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_positions, cfg.rope_theta)
        self.confidence = ConfidenceHead(h) if cfg.confidence else None
        register_draft_vocab(self, cfg.draft_vocab_size)
        with torch.no_grad():
            for m in (self.fc, self.q_proj, self.kv_proj, self.o_proj, self.gate_up_proj, self.down_proj):
                nn.init.normal_(m.weight, std=0.02)
            norm_w = getattr(target.final_norm, "weight", None)
            if norm_w is not None and norm_w.device.type != "meta":
                self.norm.weight.copy_(0.25 * norm_w.float())

    max_draft_tokens = 10**6

    def make_drafter(self, num_draft_tokens: int, seed: int = 0) -> "Eagle3Drafter":
        return Eagle3Drafter(self, num_draft_tokens, seed)

    # ---- pieces -------------------------------------------------------------------------

    def layer_input(self, token_ids: torch.Tensor, g_prev: torch.Tensor) -> torch.Tensor:
        emb = self.target.embed_tokens(token_ids).to(self.fc.weight.dtype)
        return torch.cat([self.emb_norm(emb), self.hidden_norm(g_prev.to(self.fc.weight.dtype))], dim=-1)

    def qkv(self, x: torch.Tensor, positions: torch.Tensor):
        """x [..., T, 2h] -> rotated q [..., T, H, D], k, v [..., T, Hkv, D]."""
        q = rotate(self.q_proj(x).view(*x.shape[:-1], self.nh, self.hd), positions, self.rotary)
        k, v = self.kv_proj(x).view(*x.shape[:-1], 2, self.nkv, self.hd).unbind(-3)
        return q, rotate(k, positions, self.rotary), v

    def finish(self, g_prev: torch.Tensor, q, k, v, mask) -> torch.Tensor:
        """Attention (q [B, Q, H, D] over k/v [B, L, Hkv, D]) + residual + MLP -> h [B, Q, hidden]."""
        dtype = q.dtype
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2).to(dtype), v.transpose(1, 2).to(dtype)
        if qt.device.type == "cpu" and dtype != torch.float32:
            qt, kt, vt = qt.float(), kt.float(), vt.float()
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True)
        x = g_prev.to(dtype) + self.o_proj(o.to(dtype).transpose(1, 2).reshape(*q.shape[:2], -1))
        gate, up = self.gate_up_proj(self.post_attention_layernorm(x)).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)

    def logits_and_confidence(self, h: torch.Tensor, lm_head: nn.Module | None = None):
        """`lm_head`: a draft-vocabulary head instead of the target's. Without one (training),
        logits cover the draft vocabulary when the drafter has one."""
        if lm_head is None and self.draft_vocab is not None:
            logits = vocab_logits(self.norm(h), self.target.lm_head.weight, self.draft_vocab, self.target.dtype)
        else:
            flat = self.norm(h).reshape(-1, h.shape[-1]).to(self.target.dtype)
            head = lm_head if lm_head is not None else self.target.lm_head
            logits = head(flat).float().view(*h.shape[:-1], -1)
        conf = self.confidence(h) if self.confidence is not None else None
        return logits, conf

    def sts_terms(self, block: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        return calibration_terms(self.config.confidence_temperatures, self.config.confidence_biases,
                                 block, device)

    # ---- training: TTT over γ steps ------------------------------------------------------

    def train_forward(self, token_ids, features, num_tokens, anchors, keep):
        from draft.training.anchors import block_labels

        gamma = self.config.block_size
        bsz, seq = token_ids.shape
        device = token_ids.device
        _, label_pos, mask = block_labels(token_ids, num_tokens, anchors, keep, gamma)
        pos = torch.arange(seq, device=device).expand(bsz, -1)
        g = self.fc(features.to(self.fc.weight.dtype))  # [B, S, h]: g_t
        g_prev = torch.cat([torch.zeros_like(g[:, :1]), g[:, :-1]], dim=1)  # g_{t-1}
        t_idx = torch.arange(seq, device=device)
        keys_k, keys_v, hs = [], [], []
        for j in range(1, gamma + 1):
            q, k, v = self.qkv(self.layer_input(token_ids, g_prev), pos)
            keys_k.append(k)
            keys_v.append(v)
            anchor = t_idx - (j - 1)  # [S] the chain's anchor of query t
            blocks = []
            for i in range(1, j + 1):  # keys of step i at position t' are chain position i-1
                t_key = t_idx[None, :]
                if i == 1:
                    vis = (t_key < anchor[:, None]) | (t_key == anchor[:, None])
                else:
                    vis = t_key == (anchor[:, None] + i - 1)
                blocks.append(vis)
            # padded queries (anchor < 0) see only key 0 of step 1, keeping softmax finite
            vis = torch.cat(blocks, dim=1)
            vis[:, 0] |= anchor < 0
            h = self.finish(g_prev, q, torch.cat(keys_k, 1), torch.cat(keys_v, 1), vis[None, None])
            hs.append(h)
            g_prev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
        # chain of anchor a at step j sits at position a + j - 1
        hsel = torch.stack([hs[j].gather(1, label_pos[:, :, j, None].expand(-1, -1, h.shape[-1]))
                            for j in range(gamma)], dim=2)  # [B, N, γ, h]
        logits, conf = self.logits_and_confidence(hsel)
        return logits, conf, label_pos, mask


class Eagle3Drafter(LearnedDrafter):
    """γ autoregressive single-token steps per proposal (batched over requests); sampling as in
    DSparkDrafter: softmax(logits / T) with the request's temperature, argmax when greedy."""

    def __init__(self, model: Eagle3Model, num_draft_tokens: int, seed: int = 0) -> None:
        super().__init__(model, "eagle3", num_draft_tokens, model.config.target_layers,
                         model.target.device, seed)
        prepack_linears(model)  # as the target's (a model trained further needs a new drafter)
        self.lm_head = draft_vocab_head(model.target.lm_head.weight, model.draft_vocab)

    @property
    def context_width(self) -> int:
        m = self.model
        return 2 * m.nkv * m.hd + m.config.hidden_size  # K, V and the fused feature g

    def _split(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[..., width] -> K, V [..., Hkv, D] and g [..., h]."""
        m = self.model
        kv = m.nkv * m.hd
        k, v, g = rows.split([kv, kv, rows.shape[-1] - 2 * kv], dim=-1)
        return k.unflatten(-1, (m.nkv, m.hd)), v.unflatten(-1, (m.nkv, m.hd)), g

    def _extend_context(self, inputs: list[DraftInput]) -> None:
        m = self.model
        assert self.context is not None
        for x in inputs:
            f = x.context_features
            if f is None or not f.shape[0]:
                continue
            n = f.shape[0]
            start = x.num_computed_tokens - n
            g = m.fc(f.to(m.fc.weight.dtype))  # [n, h]
            # K/V at position p read g of p - 1, which an earlier step (or request) paged
            first = self._split(self.context.read(x.block_table, start - 1))[2][None] if start else torch.zeros_like(g[:1])
            g_prev = torch.cat([first.to(g.dtype), g[:-1]])
            ids = torch.tensor(x.token_ids[start:start + n], device=g.device)
            pos = torch.arange(start, start + n, device=g.device)
            _, k, v = m.qkv(m.layer_input(ids, g_prev), pos)
            self.context.write(self.context.slots(x.block_table, start, start + n),
                               torch.cat([k.flatten(1), v.flatten(1), g], dim=-1))

    def _draft(self, inputs: list[DraftInput]) -> list[Proposal]:
        m = self.model
        gamma, num = self.num_draft_tokens, len(inputs)
        assert self.context is not None
        lengths = [x.num_computed_tokens for x in inputs]
        device = m.fc.weight.device
        l_max = max(lengths)
        k_ctx, v_ctx, g_ctx = self._split(self.context.gather([x.block_table for x in inputs], lengths))
        extra = k_ctx.new_zeros(num, gamma, m.nkv, m.hd)
        ks, vs = torch.cat([k_ctx, extra], dim=1), torch.cat([v_ctx, extra.clone()], dim=1)
        g_prev = g_ctx[torch.arange(num), torch.tensor(lengths) - 1]  # [R, h]: position L-1's
        pos0 = torch.tensor(lengths, device=device)
        key_pos = torch.arange(l_max + gamma, device=device)
        prev = torch.tensor([x.token_ids[-1] for x in inputs], device=device)
        sampling = DraftSampling(inputs, m.draft_vocab, m.config.vocab_size, self.generator, device)
        sts_t, sts_b = m.sts_terms(gamma, device)
        conf = []
        for j in range(self.num_positions(inputs)):
            q, k, v = m.qkv(m.layer_input(prev, g_prev)[:, None], (pos0 + j)[:, None])
            ks[:, l_max + j], vs[:, l_max + j] = k[:, 0], v[:, 0]
            vis = (key_pos[None, :] < pos0[:, None]) | ((key_pos[None, :] >= l_max) & (key_pos[None, :] <= l_max + j))
            h = m.finish(g_prev[:, None], q, ks, vs, vis[:, None, None])  # [R, 1, h]
            logits, c = m.logits_and_confidence(h, self.lm_head)
            tok = sampling.draw(logits[:, 0])
            conf.append(calibrated(c[:, 0], sts_t[j], sts_b[j]) if c is not None else torch.ones(num, device=device))
            prev, g_prev = tok, h[:, 0]
        return sampling.proposals(conf)
