"""The small tokenizer interface the data pipeline needs, over ``transformers`` or bytes.

:class:`HFTokenizer` wraps any ``transformers`` tokenizer. :class:`ByteTokenizer` needs nothing:
it maps UTF-8 bytes to ids 3..258 (0 pad, 1 bos, 2 eos) so that randomly initialised models from a
``transformers`` config can be trained offline, in tests and examples, without a tokenizer download.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Protocol


class Tokenizer(Protocol):
    """What peftkit's data pipeline asks of a tokenizer."""

    pad_id: int
    eos_id: int | None
    vocab_size: int
    fingerprint: str

    def encode(self, text: str, special: bool) -> list[int]:
        """Token ids of ``text``; ``special`` adds the model's special tokens (BOS, [CLS]…[SEP], </s>)."""
        ...

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` without special tokens."""
        ...

    def chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """``messages`` rendered with the chat template."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0 pad, 1 bos, 2 eos, 3 + byte value. Vocabulary size 259."""

    pad_id = 0
    bos_id = 1
    eos_id: int | None = 2
    vocab_size = 259
    fingerprint = "peftkit-bytes-v1"

    def encode(self, text: str, special: bool) -> list[int]:
        """Ids of ``text``'s UTF-8 bytes, preceded by BOS when ``special``."""
        ids = [b + 3 for b in text.encode("utf-8")]
        return [self.bos_id, *ids] if special else ids

    def decode(self, ids: list[int]) -> str:
        """Text of the byte ids in ``ids`` (special ids dropped, invalid UTF-8 replaced)."""
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", errors="replace")

    def chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """A minimal ChatML-like template: ``<|role|>\\ncontent\\n`` per message."""
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
        return text + ("<|assistant|>\n" if add_generation_prompt else "")


class HFTokenizer:
    """A ``transformers`` tokenizer behind the :class:`Tokenizer` interface."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        if tok.pad_token_id is None:  # causal LMs often lack one; padding is masked anyway
            tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
        self.pad_id: int = int(tok.pad_token_id if tok.pad_token_id is not None else 0)
        self.eos_id: int | None = tok.eos_token_id
        self.vocab_size: int = len(tok)
        vocab = json.dumps(sorted(tok.get_vocab().items())[:5000]) + type(tok).__name__
        self.fingerprint = hashlib.sha256(vocab.encode()).hexdigest()[:16]

    def encode(self, text: str, special: bool) -> list[int]:
        """Ids of ``text`` (``special``: with the tokenizer's special tokens)."""
        return list(self.tok(text, add_special_tokens=special)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` without special tokens."""
        return str(self.tok.decode(ids, skip_special_tokens=True))

    def chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """``messages`` through the tokenizer's chat template (or ByteTokenizer's if it has none)."""
        if getattr(self.tok, "chat_template", None):
            return str(
                self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            )
        return ByteTokenizer().chat(messages, add_generation_prompt)


def load_tokenizer(path: str | None) -> Tokenizer:
    """The tokenizer in directory ``path`` via ``transformers``; :class:`ByteTokenizer` when there is none.

    Args:
        path: a directory that may hold tokenizer files, or ``None``.
    """
    if (
        path is not None
        and Path(path).is_dir()
        and any(
            (Path(path) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model")
        )
    ):
        from transformers import AutoTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(path))
    return ByteTokenizer()
