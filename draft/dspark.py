"""DSpark drafter (and DFlash, the same backbone without the sequential head).

Backbone: a few transformer layers over one block of γ inputs, the anchor's embedding followed by
γ-1 copies of a learned mask embedding, at positions p..p+γ-1 (p = the anchor's position). Input
k predicts token x_{k+1}: γ inputs give γ logits. Attention inside the block is bidirectional.
Every layer also attends to the target's context: hidden states of `target_layers` at all
committed positions before the anchor, concatenated, projected by one shared `fc` and RMS-normed,
then turned into extra K/V by each layer's own K/V projections (KV injection). Embedding and LM
head are the target's, frozen and shared (never saved with the drafter).

Then the sequential head (draft/heads.py) adds B_k(x_{k-1}) to the base logits, left to right,
and the confidence head estimates each token's acceptance. At inference the context K/V are
cached per request and grow with the committed tokens; rejected positions are dropped.
"""

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from draft.base import DraftInput, LearnedDrafter, Proposal, TargetHandle
from draft.heads import ConfidenceHead, calibrated, calibration_terms, make_head
from engine.model import (
    Linear,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    linear_of_rows,
    prepack_linears,
)
from engine.sampler import race_variables, sample_rows


@dataclass(frozen=True, slots=True)
class DSparkConfig:
    kind: str = "dspark"  # dspark | dflash (the same backbone, head="none")
    hidden_size: int = 576  # = the target's (shared embedding and LM head)
    vocab_size: int = 49152
    num_layers: int = 2
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    intermediate_size: int = 1024
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    max_positions: int = 8192
    target_layers: tuple[int, ...] = (1, 8, 15, 22, 29)
    block_size: int = 7  # γ the drafter is trained for
    head: str = "markov"  # markov | rnn | none
    head_rank: int = 32
    confidence: bool = True
    # Sequential Temperature Scaling of the confidence logits, c_k = sigmoid(z_k / T_k + b_k),
    # one temperature and one bias per position (None: T = 1, b = 0).
    confidence_temperatures: tuple[float, ...] | None = None
    confidence_biases: tuple[float, ...] | None = None
    target_model: str = ""  # the target this drafter was trained against (informational)
    # Draft vocabulary: at inference, propose only among this many tokens (the most frequent in
    # the target's training responses; ids in the `draft_vocab` buffer); 0: all. It saves most
    # of a draft's LM-head, softmax and sampling cost. Training then computes logits over it too.
    draft_vocab_size: int = 0

    def to_json(self) -> dict:
        d = asdict(self)
        d["target_layers"] = list(self.target_layers)
        for name in ("confidence_temperatures", "confidence_biases"):
            if d[name] is not None:
                d[name] = list(d[name])
        return d

    @classmethod
    def from_json(cls, d: dict):
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        if "target_layers" in d:
            d["target_layers"] = tuple(d["target_layers"])
        for name in ("confidence_temperatures", "confidence_biases"):
            if d.get(name) is not None:
                d[name] = tuple(d[name])
        return cls(**d)


class DraftLayer(nn.Module):
    """Pre-norm attention (block queries over [context K/V; block K/V]) + SwiGLU MLP."""

    def __init__(self, cfg: DSparkConfig) -> None:
        super().__init__()
        h, self.nh, self.nkv, self.hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.q_proj = Linear(h, self.nh * self.hd, bias=False)
        self.kv_proj = Linear(h, 2 * self.nkv * self.hd, bias=False)
        self.o_proj = Linear(self.nh * self.hd, h, bias=False)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.gate_up_proj = Linear(h, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, h, bias=False)

    def kv(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding
           ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., T, hidden] at positions [..., T] -> rotated K and V [..., T, Hkv, D]."""
        k, v = self.kv_proj(x).view(*x.shape[:-1], 2, self.nkv, self.hd).unbind(-3)
        return rotate(k, positions, rotary), v

    def context_kv(self, context: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding):
        """K/V injection: the projected, normed target features [..., T, hidden] (no layer norm)."""
        return self.kv(context, positions, rotary)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding,
                ctx_k: torch.Tensor, ctx_v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, Q, hidden] at positions [B, Q]; ctx_k/v [B, L, Hkv, D]; mask [B, 1, Q, L + Q]."""
        y = self.input_layernorm(x)
        q = rotate(self.q_proj(y).view(*y.shape[:-1], self.nh, self.hd), positions, rotary)
        k, v = self.kv(y, positions, rotary)
        k = torch.cat([ctx_k.to(k.dtype), k], dim=1).transpose(1, 2)  # [B, Hkv, L + Q, D]
        v = torch.cat([ctx_v.to(v.dtype), v], dim=1).transpose(1, 2)
        q = q.transpose(1, 2)  # [B, H, Q, D]
        dtype = q.dtype
        if q.device.type == "cpu" and dtype != torch.float32:  # CPU SDPA is slow in bf16
            q, k, v = q.float(), k.float(), v.float()
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        x = x + self.o_proj(o.to(dtype).transpose(1, 2).reshape(*x.shape[:-1], self.nh * self.hd))
        gate, up = self.gate_up_proj(self.post_attention_layernorm(x)).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)


def register_draft_vocab(model: nn.Module, size: int) -> None:
    """The `draft_vocab` buffer of a drafter model (token ids, saved with its weights), or None."""
    if size:
        model.register_buffer("draft_vocab", torch.zeros(size, dtype=torch.long))
    else:
        model.draft_vocab = None


def vocab_logits(h: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor | None,
                 dtype: torch.dtype) -> torch.Tensor:
    """Training logits [..., V or len(rows)] fp32 of hidden h [..., hidden] through the frozen
    shared LM head `weight`, only its draft-vocabulary `rows` when given."""
    w = weight if rows is None else weight.index_select(0, rows)
    return F.linear(h.to(dtype), w.to(dtype)).float()


def draft_vocab_head(weight: torch.Tensor, ids: torch.Tensor | None) -> nn.Module | None:
    """A prepacked output layer computing only the draft vocabulary's rows of `weight`."""
    if ids is None:
        return None
    head = linear_of_rows(weight, ids)
    prepack_linears(head)
    return head


RACE_CANDIDATES = 64


class DraftSampling:
    """Left-to-right sampling of one batched draft: softmax(logits / T) with each request's
    temperature T, the argmax for greedy requests (whose `draft_probs` are then None), logits
    over the draft vocabulary `vocab_ids` when there is one. Every token is drawn from exactly
    the row `proposals` reports (as a full-vocabulary row), which keeps verification lossless.
    Seeded requests draw by their output positions' races (`DraftInput.seed`), the variables
    the target's samples use, so a draft is accepted when both distributions pick the same
    winner."""

    def __init__(self, inputs: list[DraftInput], vocab_ids: torch.Tensor | None, vocab_size: int,
                 generator: torch.Generator, device: torch.device) -> None:
        self.temps = [x.temperature if x.temperature is not None else 1.0 for x in inputs]
        self.greedy = torch.tensor([t == 0 for t in self.temps], device=device)
        self.inv_t = torch.tensor([1.0 / t if t > 0 else 1.0 for t in self.temps], device=device)[:, None]
        self.all_greedy = all(t == 0 for t in self.temps)  # no distribution is needed then
        self.vocab_ids, self.vocab_size, self.generator = vocab_ids, vocab_size, generator
        self.seeded = [(r, x.seed, x.num_output_tokens) for r, x in enumerate(inputs)
                       if x.seed is not None and self.temps[r] > 0]
        self.tokens: list[torch.Tensor] = []
        self.probs: list[torch.Tensor] = []

    def draw(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [R, V or draft vocabulary] -> the next draft token ids [R] (full vocabulary)."""
        if self.all_greedy:
            tok = logits.argmax(-1)
        else:
            p = (logits * self.inv_t).softmax(-1)
            u = torch.rand(p.shape[0], device=p.device, dtype=torch.float64, generator=self.generator)
            tok = torch.where(self.greedy, logits.argmax(-1), sample_rows(p, u))
            for r, seed, first in self.seeded:
                tok[r] = self._race(p[r], seed, first + len(self.tokens))
            self.probs.append(p)
        if self.vocab_ids is not None:
            tok = self.vocab_ids[tok]
        self.tokens.append(tok)
        return tok

    def _race(self, probs: torch.Tensor, seed: int, position: int) -> torch.Tensor:
        """The race winner among the row's RACE_CANDIDATES likeliest tokens (a column of the
        row): the target's winner is almost always among them when the draft is accepted at
        all, and the verifier does not depend on how a draft was chosen."""
        top = probs.topk(min(RACE_CANDIDATES, probs.shape[0]))
        ids = top.indices if self.vocab_ids is None else self.vocab_ids[top.indices]
        return top.indices[(top.values / race_variables(seed, position, ids)).argmax()]

    def proposals(self, confidences: list[torch.Tensor]) -> list[Proposal]:
        tokens = torch.stack(self.tokens, 1).tolist()
        conf = torch.stack(confidences, 1).float().tolist()
        if self.all_greedy:
            return [Proposal(tokens[r], None, conf[r]) for r in range(len(tokens))]
        probs = torch.stack(self.probs, 1).float()  # [R, n, V or draft vocabulary]
        if self.vocab_ids is not None:  # the sampler compares full-vocabulary rows
            probs = probs.new_zeros(*probs.shape[:2], self.vocab_size).index_copy_(2, self.vocab_ids, probs)
        return [Proposal(tokens[r], None if self.temps[r] == 0 else probs[r], conf[r])
                for r in range(len(tokens))]


def rotate(x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding) -> torch.Tensor:
    """Neox rotary on x [..., T, heads, D] at positions [..., T], with the engine's tables."""
    return apply_rotary(x, *rotary.cos_sin(positions, x.dtype))


class DSparkModel(nn.Module):
    """The trainable drafter; the target's shared modules are held, not registered."""

    uses_prev_features = False

    def __init__(self, cfg: DSparkConfig, target: TargetHandle) -> None:
        super().__init__()
        assert cfg.hidden_size == target.hidden_size and cfg.vocab_size == target.vocab_size
        assert cfg.num_heads * cfg.head_dim > 0 and cfg.num_heads % cfg.num_kv_heads == 0
        self.config = cfg
        self.target = target  # a dataclass, so nn.Module does not register (or save) it
        h = cfg.hidden_size
        self.fc = Linear(len(cfg.target_layers) * h, h, bias=False)
        self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.mask_embedding = nn.Parameter(torch.zeros(h))
        self.layers = nn.ModuleList(DraftLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_positions, cfg.rope_theta)
        head = "none" if cfg.kind == "dflash" else cfg.head
        self.head = make_head(head, cfg.vocab_size, cfg.head_rank, h)
        conf_dim = h + (cfg.head_rank if self.head is not None else 0)
        self.confidence = ConfidenceHead(conf_dim) if cfg.confidence else None
        register_draft_vocab(self, cfg.draft_vocab_size)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        for layer in self.layers:
            for m in (layer.q_proj, layer.kv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.normal_(self.fc.weight, std=0.02 / math.sqrt(len(self.config.target_layers)))
        emb = self.target.embed_tokens.weight
        if emb.device.type != "meta":
            self.mask_embedding.copy_(emb.float().mean(0))
            norm_w = getattr(self.target.final_norm, "weight", None)
            if norm_w is not None:
                # a quarter of the target's output scale: random initial directions then give
                # flat rather than confidently wrong distributions
                self.norm.weight.copy_(0.25 * norm_w.float())

    # ---- pieces shared by training and inference ---------------------------------------

    def project_context(self, features: torch.Tensor) -> torch.Tensor:
        """[..., len(target_layers) * hidden] -> [..., hidden]."""
        return self.hidden_norm(self.fc(features.to(self.fc.weight.dtype)))

    def block_inputs(self, anchor_ids: torch.Tensor, block: int,
                     prev_features: torch.Tensor | None = None) -> torch.Tensor:
        """anchor_ids [N] -> [N, block, hidden]: the anchor's embedding then mask embeddings.
        (`prev_features` [N, F], the context features just before the anchor, serve MTP.)"""
        emb = self.target.embed_tokens(anchor_ids).to(self.mask_embedding.dtype)
        rest = self.mask_embedding.expand(anchor_ids.shape[0], block - 1, -1)
        return torch.cat([emb[:, None], rest], dim=1)

    def base_logits(self, h: torch.Tensor, lm_head: nn.Module | None = None) -> torch.Tensor:
        """Backbone hidden [..., hidden] -> U [..., vocab] in fp32 via the shared LM head (or
        `lm_head`, a draft-vocabulary head: U [..., its rows])."""
        shape = h.shape[:-1]
        flat = h.reshape(-1, h.shape[-1]).to(self.target.dtype)
        head = lm_head if lm_head is not None else self.target.lm_head
        return head(flat).float().view(*shape, -1)

    def confidence_logits(self, h: torch.Tensor, prev_ids: torch.Tensor) -> torch.Tensor | None:
        """h [..., hidden], prev_ids [...] -> confidence logits [...] (before STS)."""
        if self.confidence is None:
            return None
        feats = h
        if self.head is not None:
            feats = torch.cat([h, self.head.prev_embed(prev_ids).to(h.dtype)], dim=-1)
        return self.confidence(feats)

    @property
    def max_draft_tokens(self) -> int:
        return 10**6  # mask positions beyond the trained block still get (weaker) drafts

    def sts_terms(self, block: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return calibration_terms(self.config.confidence_temperatures, self.config.confidence_biases,
                                 block, device)

    def make_drafter(self, num_draft_tokens: int, seed: int = 0) -> "DSparkDrafter":
        return DSparkDrafter(self, num_draft_tokens, seed)

    # ---- training: many anchor blocks over padded sequences ----------------------------

    def forward_blocks(self, token_ids: torch.Tensor, features: torch.Tensor,
                       anchors: torch.Tensor, block: int) -> torch.Tensor:
        """Teacher-forced backbone over every anchor block.

        token_ids [B, S], features [B, S, F] (padding beyond a sequence's end is never attended:
        anchors lie inside it), anchors [B, N] positions -> hidden h [B, N, block, hidden].
        Block (b, n) attends to context positions < anchors[b, n] and to its own block.
        """
        bsz, seq = token_ids.shape
        num = anchors.shape[1]
        device = token_ids.device
        prev = features.gather(1, (anchors - 1).clamp(min=0)[..., None].expand(-1, -1, features.shape[-1]))
        x = self.block_inputs(token_ids.gather(1, anchors).reshape(-1), block,
                              prev.reshape(-1, features.shape[-1]))  # [B*N, block, h]
        x = x.view(bsz, num * block, -1)
        offs = torch.arange(block, device=device)
        q_pos = (anchors[:, :, None] + offs).reshape(bsz, -1)  # [B, N*block]
        ctx_pos = torch.arange(seq, device=device).expand(bsz, -1)
        context = self.project_context(features)  # [B, S, h]
        q_anchor = anchors.repeat_interleave(block, dim=1)  # [B, N*block]
        see_ctx = ctx_pos[:, None, :] < q_anchor[:, :, None]  # [B, Q, S]
        qb = torch.arange(num, device=device).repeat_interleave(block)
        see_block = (qb[:, None] == qb[None, :]).expand(bsz, -1, -1)  # [B, Q, Q]
        mask = torch.cat([see_ctx, see_block], dim=-1)[:, None]
        for layer in self.layers:
            ctx_k, ctx_v = layer.context_kv(context, ctx_pos, self.rotary)
            x = layer(x, q_pos, self.rotary, ctx_k, ctx_v, mask)
        return self.norm(x).view(bsz, num, block, -1)

    def train_forward(self, token_ids: torch.Tensor, features: torch.Tensor, num_tokens: torch.Tensor,
                      anchors: torch.Tensor, keep: torch.Tensor):
        """The trainer's entry point: (draft logits [B, N, γ, V], confidence logits [B, N, γ] or
        None, label positions [B, N, γ] (whose target distribution and next token position k
        must match), mask [B, N, γ])."""
        from draft.training.anchors import block_labels

        block = self.config.block_size
        prev_ids, label_pos, mask = block_labels(token_ids, num_tokens, anchors, keep, block)
        h = self.forward_blocks(token_ids, features, anchors, block)
        bsz, num = anchors.shape
        logits, conf = self.teacher_forced(h.flatten(0, 1), prev_ids.flatten(0, 1))
        logits = logits.view(bsz, num, block, -1)
        conf = None if conf is None else conf.view(bsz, num, block)
        return logits, conf, label_pos, mask

    def teacher_forced(self, h: torch.Tensor, prev_ids: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """h [N, γ, hidden], prev_ids [N, γ] (anchor, then true tokens) -> (draft logits
        [N, γ, vocab or draft vocabulary] fp32, confidence logits [N, γ] or None)."""
        rows = self.draft_vocab
        logits = vocab_logits(h, self.target.lm_head.weight, rows, self.target.dtype)
        if self.head is not None:
            logits = logits + self.head.teacher_forced(prev_ids, h, rows).float()
        return logits, self.confidence_logits(h, prev_ids)


class DSparkDrafter(LearnedDrafter):
    """The engine-facing drafter: one backbone pass per step for all proposing requests, then
    the sequential head samples left to right.

    Draft tokens are drawn from softmax(logits / T) with the request's temperature T (so the
    draft distribution has the target's sharpness), or taken as the argmax for greedy requests
    (then `draft_probs` is None: one-hot). Every token really is drawn from the row returned in
    `draft_probs`, which keeps verification lossless.
    """

    def __init__(self, model: DSparkModel, num_draft_tokens: int, seed: int = 0) -> None:
        # a drafter trained for fewer positions (MTP: 1) proposes no more than it learned
        super().__init__(model, model.config.kind, min(num_draft_tokens, model.max_draft_tokens),
                         model.config.target_layers, model.target.device, seed)
        prepack_linears(model)  # as the target's (a model trained further needs a new drafter)
        # the LM head and sequential-head output restricted to the draft vocabulary, if any
        ids = model.draft_vocab
        self.lm_head = draft_vocab_head(model.target.lm_head.weight, ids)
        self.head_out = draft_vocab_head(model.head.out.weight, ids) if model.head is not None else None
        # MTP: the target's last hidden state at the position before the anchor
        self.last_features: dict[str, torch.Tensor] = {}

    @property
    def context_width(self) -> int:
        cfg = self.model.config
        return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim  # each layer's context K and V

    def free(self, req_id: str) -> None:
        super().free(req_id)
        self.last_features.pop(req_id, None)

    def _extend_context(self, inputs: list[DraftInput]) -> None:
        m = self.model
        with_feats = [x for x in inputs if x.context_features is not None and x.context_features.shape[0]]
        if not with_feats:
            return
        assert self.context is not None
        feats = torch.cat([x.context_features for x in with_feats])  # [M, F]
        spans = [(x.num_computed_tokens - x.context_features.shape[0], x.num_computed_tokens) for x in with_feats]
        positions = torch.cat([torch.arange(a, b) for a, b in spans]).to(feats.device)
        context = m.project_context(feats)
        kv = torch.stack([torch.stack(layer.context_kv(context, positions, m.rotary), dim=1)
                          for layer in m.layers], dim=1)  # [M, layers, 2, Hkv, D]
        slots = torch.cat([self.context.slots(x.block_table, a, b) for x, (a, b) in zip(with_feats, spans)])
        self.context.write(slots, kv.flatten(1))
        if m.uses_prev_features:
            for x in with_feats:
                self.last_features[x.req_id] = x.context_features[-1]

    def _draft(self, inputs: list[DraftInput]) -> list[Proposal]:
        m, cfg = self.model, self.model.config
        gamma = self.num_draft_tokens
        device = m.mask_embedding.device
        assert self.context is not None
        lengths = [x.num_computed_tokens for x in inputs]
        num = len(inputs)
        anchors = torch.tensor([x.token_ids[-1] for x in inputs], device=device)
        pos0 = torch.tensor(lengths, device=device)
        q_pos = pos0[:, None] + torch.arange(gamma, device=device)  # [R, γ]
        gathered = self.context.gather([x.block_table for x in inputs], lengths)  # [R, L, width]
        ctx_kv = gathered.view(num, gathered.shape[1], cfg.num_layers, 2, cfg.num_kv_heads, cfg.head_dim
                               ).permute(2, 3, 0, 1, 4, 5)  # [layers, 2, R, L, Hkv, D]
        l_max = gathered.shape[1]
        see_ctx = torch.arange(l_max, device=device)[None, :] < pos0[:, None]  # [R, L]
        mask = torch.cat([see_ctx[:, None, :].expand(-1, gamma, -1),
                          torch.ones(num, gamma, gamma, dtype=torch.bool, device=device)], dim=-1)[:, None]
        prev_feats = torch.stack([self.last_features[x.req_id] for x in inputs]) if m.uses_prev_features else None
        x = m.block_inputs(anchors, gamma, prev_feats)
        for i, layer in enumerate(m.layers):
            x = layer(x, q_pos, m.rotary, ctx_kv[i, 0], ctx_kv[i, 1], mask)
        # the backbone sees the whole block it was trained on; only the first n positions
        # (what the verify plan can use) pay for LM-head rows and the sequential head
        n = self.num_positions(inputs)
        h = m.norm(x[:, :n])  # [R, n, hidden]
        base = m.base_logits(h, self.lm_head)  # [R, n, V or draft vocabulary]
        sampling = DraftSampling(inputs, m.draft_vocab, cfg.vocab_size, self.generator, device)
        sts_t, sts_b = m.sts_terms(n, device)
        state = m.head.init_state(num, h) if m.head is not None else None
        prev = anchors
        conf = []
        for k in range(n):
            logits = base[:, k]
            if m.head is not None:
                bias, state = m.head.step(state, prev, h[:, k], self.head_out)
                logits = logits + bias.float()
            tok = sampling.draw(logits)
            c = m.confidence_logits(h[:, k], prev)
            conf.append(calibrated(c, sts_t[k], sts_b[k]) if c is not None else torch.ones(num, device=device))
            prev = tok
        return sampling.proposals(conf)
