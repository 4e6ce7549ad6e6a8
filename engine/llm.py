"""Offline API shaped like vLLM's: `LLM(...).generate(prompts, params)` and `.chat(...)`."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from draft import Drafter
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.output_processor import RequestOutput
from scheduler import SamplingParams

Prompt = str | list[int]
Message = dict[str, Any]


@dataclass(slots=True)
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None


class LLM:
    """`model=None` serves the embedded default; otherwise a Hugging Face directory or .gguf."""

    def __init__(self, model: str | None = None, device: str | None = None, dtype: str | None = None,
                 drafter: Drafter | None = None, **engine_options: Any) -> None:
        self.engine = LLMEngine(EngineConfig.from_options(model, device, dtype, **engine_options), drafter)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[GenerationResult]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("give one SamplingParams or one per prompt")
        ids = [self.engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        return self._run(ids, use_tqdm)

    def chat(self, conversations: list[Message] | Sequence[list[Message]],
             params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = False) -> list[GenerationResult]:
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = [self.encode_chat(c) for c in conversations]
        return self.generate(prompts, params, use_tqdm)

    def encode_chat(self, messages: list[Message]) -> list[int]:
        return self.tokenizer.encode_chat(messages)

    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [len(token_ids), vocab] of one prefill: row i scores the token after i."""
        return self.engine.prompt_logits(token_ids)

    def _run(self, req_ids: list[str], use_tqdm: bool) -> list[GenerationResult]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(req_ids), disable=not use_tqdm, desc="generate")
        try:
            while len(done) < len(req_ids):
                for out in self.engine.step():
                    if out.finished:
                        done[out.req_id] = out
                        bar.update(1)
        except BaseException:
            for r in req_ids:
                if r not in done:
                    self.engine.abort_request(r)
            raise
        finally:
            bar.close()
        return [GenerationResult(done[r].prompt_token_ids, done[r].token_ids, done[r].text,
                                 done[r].finish_reason) for r in req_ids]
