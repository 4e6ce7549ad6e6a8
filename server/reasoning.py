"""Reasoning output of models that think in `<think>…</think>` (Qwen3, DeepSeek-R1 style):
returned as `reasoning_content`, apart from `content`, as vLLM and SGLang return it.

`ReasoningSplitter` splits a choice's text as it streams: text inside the think block is
reasoning, the rest content. A tag cut between two deltas is held back until it is whole.
Templates that open the block in the prompt (the generation prompt ends in `<think>`) start
inside it; without the closing tag the whole reply is reasoning (a reply cut by max_tokens).
"""

from dataclasses import dataclass

THINK_START, THINK_END = "<think>", "</think>"
PARSERS = ("auto", "think", "none")


def enabled(parser: str, chat_template: str | None) -> bool:
    """Whether replies are split: `think` always, `auto` when the template knows think blocks."""
    if parser not in PARSERS:
        raise ValueError(f"unknown reasoning parser {parser!r}; available: {', '.join(PARSERS)}")
    return parser == "think" or (parser == "auto" and THINK_START in (chat_template or ""))


def opens_in_prompt(prompt_tail: str) -> bool:
    """Whether the rendered prompt leaves a think block open (the reply starts inside it)."""
    return prompt_tail.rfind(THINK_START) > prompt_tail.rfind(THINK_END)


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag` (a tag possibly cut in two)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


@dataclass(slots=True)
class ReasoningSplitter:
    """One choice's split; `feed` each text delta, then `flush` at the finish. Construct it
    with `thinking=True` when the prompt opened the block."""

    thinking: bool = False  # inside the think block
    done: bool = False  # past the block (or the reply has none): the rest is content
    opened: bool = False  # a think block was seen
    pending: str = ""  # text held back: a possible cut tag
    closing: bool = False  # just past the closing tag: newlines before the content are dropped

    def __post_init__(self) -> None:
        self.opened = self.opened or self.thinking

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) that `text` adds."""
        text, self.pending = self.pending + text, ""
        reasoning, content = "", ""
        while text:
            if self.done:
                if self.closing:
                    text = text.lstrip("\n")
                    self.closing = not text
                content += text
                break
            if not self.thinking:
                stripped = text.lstrip()
                if THINK_START.startswith(stripped):  # (a start of) the opening tag: wait
                    self.pending = text
                    break
                if not stripped.startswith(THINK_START):
                    self.done = True  # the reply does not open with a think block
                    continue
                self.thinking = self.opened = True
                text = stripped[len(THINK_START):]
                continue
            i = text.find(THINK_END)
            if i < 0:
                keep = _partial_tag(text, THINK_END)
                reasoning += text[:len(text) - keep]
                self.pending = text[len(text) - keep:]
                break
            reasoning += text[:i]
            self.thinking, self.done, self.closing = False, True, True
            text = text[i + len(THINK_END):]
        return reasoning, content

    def flush(self) -> tuple[str, str]:
        """What was held back, at the end of the reply."""
        pending, self.pending = self.pending, ""
        return (pending, "") if self.thinking else ("", pending)

    def split(self, text: str) -> tuple[str | None, str]:
        """A whole reply: (reasoning, or None without a think block; content)."""
        r1, c1 = self.feed(text)
        r2, c2 = self.flush()
        return (r1 + r2 if self.opened else None), c1 + c2
