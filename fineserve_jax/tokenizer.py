"""Tokenizers: a checkpoint's Hugging Face tokenizer, the byte tokenizer, and "none".

- `HFTokenizer`: a `tokenizers.Tokenizer` (from `tokenizer.json`, or rebuilt from a GGUF's
  metadata) plus the checkpoint's chat template and special tokens. `encode(text)` adds
  BOS/EOS exactly as the tokenizer's post-processor says, which is what transformers does
  (since transformers 5, `add_bos_token`/`add_eos_token` in `tokenizer_config.json` are not
  applied when a `tokenizer.json` exists; where they disagree with the post-processor a
  warning names the file).
- `ByteTokenizer`: the embedded tiny models' vocabulary (bytes + pad/bos/eos); it prepends BOS.
- `NoTokenizer`: a checkpoint without tokenizer files. Token-id prompts work; encoding text
  raises `TokenizerError` saying how to provide one; decoded text is None.

Every tokenizer has `encode(text, add_special_tokens=True) -> ids`, `decode(ids) -> str`
(None for `NoTokenizer`), `bos_token_id`, `eos_token_id`, `vocab_size`.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used, or text given where no tokenizer exists."""


class ByteTokenizer:
    """Built-in byte-level tokenizer for the embedded tiny models.

    ids: 0 pad, 1 bos, 2 eos, 3 + byte for each UTF-8 byte.
    """

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    offset = 3
    vocab_size = 259
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        ids = [b + self.offset for b in text.encode("utf-8")]
        return ([self.bos_token_id] + ids) if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        data = bytes(i - self.offset for i in ids if self.offset <= i < self.offset + 256)
        return data.decode("utf-8", errors="replace")


class NoTokenizer:
    """Stands in for a tokenizer a checkpoint does not have: token ids only."""

    bos_token_id = eos_token_id = None
    vocab_size = 0
    chat_template = None

    def __init__(self, reason: str):
        self.reason = reason

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        raise TokenizerError(f"{self.reason}; text prompts need a tokenizer: pass token-id "
                             f"prompts, or load_model(..., tokenizer='byte') to use the byte "
                             f"tokenizer, or tokenizer=PATH to a tokenizer.json")

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> None:
        return None


class HFTokenizer:
    """A Hugging Face fast tokenizer with the checkpoint's special tokens and chat template."""

    def __init__(self, tokenizer, bos_token_id: Optional[int] = None,
                 eos_token_id: Optional[int] = None, chat_template: Optional[str] = None,
                 special_tokens: Optional[Mapping[str, Optional[str]]] = None, source: str = ""):
        self._tok = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        self.source = source
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: str, bos_token_id: Optional[int] = None,
                  eos_token_id: Optional[int] = None) -> "HFTokenizer":
        """From `tokenizer.json` (a file, or a directory holding it and maybe
        `tokenizer_config.json` / `chat_template.jinja`). `bos_token_id`/`eos_token_id` (e.g.
        from config.json) apply where `tokenizer_config.json` names no such token."""
        from tokenizers import Tokenizer

        directory, file = (path, os.path.join(path, "tokenizer.json")) if os.path.isdir(path) \
            else (os.path.dirname(path), path)
        if not os.path.isfile(file):
            raise TokenizerError(f"{file}: no such tokenizer file")
        try:
            tok = Tokenizer.from_file(file)
        except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exceptions on bad JSON
            raise TokenizerError(f"{file}: not a valid tokenizer.json ({e})") from None
        config = _read_json_object(os.path.join(directory, "tokenizer_config.json"))
        specials = {k: _token_content(config.get(k)) for k in
                    ("bos_token", "eos_token", "unk_token", "pad_token")}
        ids = {}
        for key, fallback in (("bos_token", bos_token_id), ("eos_token", eos_token_id)):
            name = specials[key]
            ids[key] = tok.token_to_id(name) if name is not None else fallback
            if name is not None and ids[key] is None:
                raise TokenizerError(f"{os.path.join(directory, 'tokenizer_config.json')}: "
                                     f"{key} {name!r} is not in {file}")
            if specials[key] is None and ids[key] is not None:
                specials[key] = tok.id_to_token(ids[key])
        self = cls(tok, ids["bos_token"], ids["eos_token"], _chat_template(directory, config),
                   specials, source=file)
        self._warn_on_disagreement(config, os.path.join(directory, "tokenizer_config.json"))
        return self

    def _warn_on_disagreement(self, config: Mapping[str, Any], config_file: str) -> None:
        probe = self._tok.encode("a", add_special_tokens=True).ids
        for key, tid, present in (
                ("add_bos_token", self.bos_token_id,
                 bool(probe) and probe[0] == self.bos_token_id),
                ("add_eos_token", self.eos_token_id,
                 bool(probe) and probe[-1] == self.eos_token_id)):
            want = config.get(key)
            if isinstance(want, bool) and tid is not None and want != present:
                warnings.warn(
                    f"{config_file}: {key} is {want} but the post-processor of {self.source} "
                    f"{'adds' if present else 'does not add'} that token; following "
                    f"{os.path.basename(self.source)} as transformers >= 5 does", stacklevel=3)

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        """Token ids of `text`; BOS/EOS as the post-processor adds them (when asked to)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            add_generation_prompt: bool = True, **variables) -> str:
        """Render the checkpoint's chat template (Jinja, as transformers renders it: sandboxed,
        `trim_blocks`, `lstrip_blocks`) into the prompt text; encode it with `encode`."""
        if not self.chat_template:
            raise TokenizerError(f"{self.source}: the tokenizer has no chat template")
        return render_chat_template(self.chat_template, messages, add_generation_prompt,
                                    bos_token=self.special_tokens.get("bos_token") or "",
                                    eos_token=self.special_tokens.get("eos_token") or "",
                                    **variables)


def render_chat_template(template: str, messages: Sequence[Mapping[str, Any]],
                         add_generation_prompt: bool = True, **variables) -> str:
    """A Hugging Face chat template rendered with Jinja2 in a sandbox."""
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("chat templates need jinja2: pip install 'fineserve_jax[gguf]' "
                          "(or pip install jinja2)") from None

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                       extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **variables)
    except TemplateError as e:
        raise TokenizerError(f"chat template failed: {e}") from None


def load_tokenizer(path: str, bos_token_id: Optional[int] = None,
                   eos_token_id: Optional[int] = None):
    """The tokenizer of checkpoint directory `path`: `HFTokenizer` from its `tokenizer.json`,
    or `NoTokenizer` when it has none (never a silent byte-tokenizer fallback)."""
    if os.path.isfile(os.path.join(path, "tokenizer.json")) or (
            os.path.isfile(path) and path.endswith(".json")):
        return HFTokenizer.from_file(path, bos_token_id, eos_token_id)
    return NoTokenizer(f"{path}: the checkpoint has no tokenizer.json")


def _read_json_object(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: must hold a JSON object, got {type(data).__name__}")
    return data


def _token_content(value) -> Optional[str]:
    # tokenizer_config.json writes a special token as a string or an AddedToken dict.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(directory: str, config: Mapping[str, Any]) -> Optional[str]:
    jinja = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja):  # transformers gives the separate file priority
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    tpl = config.get("chat_template")
    if isinstance(tpl, list):  # named templates: transformers uses "default"
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default")
    return tpl if isinstance(tpl, str) else None
