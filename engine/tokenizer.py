"""Text <-> token ids and chat templates, built from a GGUF file or a Hugging Face model folder."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import gguf
import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from scheduler.errors import InvalidRequest, ModelLoadError

logger = logging.getLogger(__name__)

# Split regexes of llama.cpp's BPE pre-tokenizers (`tokenizer.ggml.pre`), as in its llama-vocab.cpp.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
           "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
_IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3"}  # Llama 3's tokenizer.json sets ignore_merges
_CONTROL, _USER_DEFINED = 3, 4  # gguf.TokenType values
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def _byte_spelling() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    rest = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(rest)}}


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer matching llama.cpp's `tokenizer.ggml.pre` name."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in _SPLITS)
    if pre == "smollm":  # as SmolLM's own tokenizer.json: split off each digit, then GPT-2 regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _SPLITS:
        split = pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated")
        return pre_tokenizers.Sequence([split, byte_level])
    if pre not in ("default", "gpt2"):
        logger.warning("unknown tokenizer.ggml.pre %r; using the GPT-2 byte-level split", pre)
    return byte_level


_BYTE_OF_CHAR = {c: b for b, c in _byte_spelling().items()}


class _GenerationTag(Extension):
    """HF's `{% generation %}...{% endgeneration %}` (assistant-mask markers): renders the body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that, as in transformers, refuses underscore-prefixed attributes."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, attrs = args[0], dict(*args[1:], **kwargs)
        _raise_if_private(*attrs)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _raise_if_private(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _raise_if_private(*names: Any) -> None:
    if bad := [n for n in names if isinstance(n, str) and n.startswith("_")]:
        raise jinja2.exceptions.SecurityError(f"namespace attribute {bad[0]!r} is not allowed")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """transformers' `tojson`: plain json.dumps, without Jinja's HTML escaping."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _jinja_env() -> ImmutableSandboxedEnvironment:
    """The environment transformers renders chat templates in."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, namespace=_Namespace,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


_ENV = _jinja_env()


def _message(message: Any, i: int) -> dict[str, Any]:
    """A copy of one chat message with None fields dropped and text parts flattened to a string."""
    if not isinstance(message, dict):
        raise InvalidRequest(f"messages[{i}] must be an object", param="messages")
    out = {k: v for k, v in message.items() if v is not None}
    if not isinstance(out.get("role"), str):
        raise InvalidRequest(f"messages[{i}].role must be a string", param="messages")
    content = out.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text"
                   and isinstance(p.get("text"), str) for p in content):
            raise InvalidRequest(f"messages[{i}].content: only text parts are supported",
                                 param="messages")
        out["content"] = "\n".join(p["text"] for p in content)
    elif content is not None and not isinstance(content, str):
        raise InvalidRequest(f"messages[{i}].content must be a string or a list of text parts, "
                             f"not {type(content).__name__}", param="messages")
    return out


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or {} when the file is absent."""
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the model's special ids and chat template."""

    def __init__(self, inner: HFTokenizer, *, bos_token_id: int | None, eos_token_ids: set[int],
                 add_bos: bool, chat_template: str | None, special_tokens: dict[str, str]) -> None:
        """Wrap `inner`; `special_tokens` (bos_token, eos_token, ...) are template variables."""
        self._inner = inner
        self._byte_level = isinstance(inner.decoder, decoders.ByteLevel)
        self.bos_token_id = bos_token_id
        self.eos_token_ids: frozenset[int] = frozenset(eos_token_ids)
        self._add_bos = add_bos and bos_token_id is not None
        self.chat_template = chat_template
        self._special = special_tokens
        self._template: jinja2.Template | None = None
        self._template_error = "this model has no chat template"
        if chat_template is not None:
            try:
                self._template = _ENV.from_string(chat_template)
            except jinja2.TemplateError as e:
                self._template_error = f"the model's chat template does not compile: {e}"
                logger.warning("%s", self._template_error)

    @property
    def backend(self) -> HFTokenizer:
        """The `tokenizers.Tokenizer` itself, for libraries built on it (grammar engines)."""
        return self._inner

    @classmethod
    def from_gguf(cls, reader: gguf.GGUFReader) -> Tokenizer:
        """Build the tokenizer described by a GGUF file's `tokenizer.*` metadata."""
        def get(key: str, default: Any = None) -> Any:
            field = reader.fields.get(key)
            return default if field is None else field.contents()

        kind = get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ModelLoadError(f"unsupported GGUF tokenizer model {kind!r}: only byte-level BPE "
                                 "('gpt2') is supported (sentencepiece 'llama' is not)")
        tokens: list[str] = get("tokenizer.ggml.tokens") or []
        merges: list[str] = get("tokenizer.ggml.merges") or []
        if not tokens or not merges:
            raise ModelLoadError("GGUF file lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
        types: list[int] = get("tokenizer.ggml.token_type") or []
        types = types if len(types) == len(tokens) else [1] * len(tokens)
        spelling = _byte_spelling()
        alphabet = set(spelling.values())
        vocab: dict[str, int] = {}
        for i, (token, token_type) in enumerate(zip(tokens, types, strict=True)):
            if token_type not in (_CONTROL, _USER_DEFINED) and not set(token) <= alphabet:
                token = "".join(spelling[b] for b in token.encode("utf-8"))
            vocab.setdefault(token, i)
        pre = get("tokenizer.ggml.pre", "default")
        try:
            bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                             ignore_merges=pre in _IGNORE_MERGES)
        except Exception as e:  # tokenizers raises plain Exceptions on bad merges
            raise ModelLoadError(f"invalid BPE vocabulary/merges in GGUF file: {e}") from e
        inner = HFTokenizer(bpe)
        inner.pre_tokenizer = _pre_tokenizer(pre)
        inner.decoder = decoders.ByteLevel()
        # Control tokens are special (skipped on decode); user-defined ones are matched whole but
        # decoded like text, as in llama.cpp and transformers.
        added = [AddedToken(t, normalized=False, special=k == _CONTROL)
                 for t, k in zip(tokens, types, strict=True) if k in (_CONTROL, _USER_DEFINED)]
        inner.add_special_tokens([a for a in added if a.special])
        inner.add_tokens([a for a in added if not a.special])
        keys = ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")
        ids = {n: get(f"tokenizer.ggml.{k}") for n, k in zip(_SPECIAL_NAMES, keys, strict=True)}
        special = {n: tokens[i] for n, i in ids.items() if i is not None and 0 <= i < len(tokens)}
        eos = {get(f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id", "eom_token_id")}
        eos.discard(None)
        return cls(inner, bos_token_id=ids["bos_token"], eos_token_ids=eos,
                   add_bos=bool(get("tokenizer.ggml.add_bos_token", False)),
                   chat_template=get("tokenizer.chat_template"), special_tokens=special)

    @classmethod
    def from_hf_dir(cls, path: Path) -> Tokenizer:
        """Load a folder's tokenizer.json, tokenizer_config.json, chat template and eos ids."""
        path = Path(path)
        try:
            inner = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:
            raise ModelLoadError(f"cannot load {path / 'tokenizer.json'}: {e}") from e
        cfg = _read_json(path / "tokenizer_config.json")
        values = {n: v.get("content") if isinstance(v, dict) else v for n, v in cfg.items()}
        special = {n: values[n] for n in _SPECIAL_NAMES if isinstance(values.get(n), str)}
        template = cfg.get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default", next(iter(named.values()), None))
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        bos = inner.token_to_id(special["bos_token"]) if "bos_token" in special else None
        eos = {inner.token_to_id(special["eos_token"])} if "eos_token" in special else set()
        eos.discard(None)
        for name in ("generation_config.json", "config.json"):
            value = _read_json(path / name).get("eos_token_id")
            values = value if isinstance(value, list) else [value]
            eos.update(v for v in values if isinstance(v, int))
        # The post-processor may already add BOS; only prepend it ourselves when it does not.
        adds_bos = bos is not None and inner.encode("a", add_special_tokens=True).ids[:1] == [bos]
        return cls(inner, bos_token_id=bos, eos_token_ids=eos,
                   add_bos=bool(cfg.get("add_bos_token")) and not adds_bos,
                   chat_template=template if isinstance(template, str) else None,
                   special_tokens=special)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._inner.get_vocab_size(with_added_tokens=True)

    def id_to_token(self, i: int) -> str | None:
        """The vocabulary entry of id `i` (byte-level spelling, e.g. 'Ġhi'), or None."""
        return self._inner.id_to_token(i)

    def token_bytes(self, i: int) -> bytes:
        """The bytes token `i` stands for; a byte-level BPE piece may be partial UTF-8, which
        decoding it alone would turn into U+FFFD (OpenAI's logprobs report these bytes)."""
        piece = self._inner.id_to_token(i)
        if self._byte_level and piece is not None and all(c in _BYTE_OF_CHAR for c in piece):
            return bytes(_BYTE_OF_CHAR[c] for c in piece)
        return self.decode([i], skip_special_tokens=False).encode()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special tokens written in the text always map to their ids."""
        ids = self._inner.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._add_bos:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`."""
        return self._inner.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode_chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        """Prompt ids of a conversation: the rendered template, encoded without adding special
        tokens again (the template already writes them)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt=True, **kwargs),
                           add_special_tokens=False)

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None, **kwargs: Any) -> str:
        """Render `messages` with the model's chat template exactly as transformers does.

        `kwargs` become extra template variables (e.g. `enable_thinking`).
        """
        if self._template is None:
            raise InvalidRequest(self._template_error, param="messages")
        if not isinstance(messages, list):
            raise InvalidRequest("messages must be a list", param="messages")
        chat = [_message(m, i) for i, m in enumerate(messages)]
        try:
            return self._template.render(messages=chat, tools=tools, documents=None,
                                         add_generation_prompt=add_generation_prompt,
                                         **{**self._special, **kwargs})
        except jinja2.TemplateError as e:
            raise InvalidRequest(f"chat template error: {e}", param="messages") from e
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise InvalidRequest(f"chat template failed on these messages: {e!r}",
                                 param="messages") from e
