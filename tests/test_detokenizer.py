"""Unit tests for incremental detokenization and stop strings (router/scheduling/detokenizer.py)."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from shardline.router.scheduling import detokenizer as detok_module
from shardline.router.scheduling.detokenizer import IncrementalDetokenizer

CORPUS = [
    "Café crème brûlée, naïve résumé, déjà vu à la française.",
    "日本語のテキストを少し書きます。東京と京都。",
    "Emoji: 🚀 launch 🎉 party 👍🏽 thumbs, 🇫🇷 flag and ✨ sparkles.",
    "hello world, the quick brown fox jumps over the lazy dog; stop here.",
]


def _gpt2_byte_chars() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2's bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=331,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="module")
def byte_ids(tokenizer: PreTrainedTokenizerFast) -> dict[int, int]:
    """Token id of each single byte, so tests can split characters wherever they like."""
    return {b: tokenizer.convert_tokens_to_ids(c) for b, c in _gpt2_byte_chars().items()}


def _bytes_as_ids(text: str, byte_ids: dict[int, int]) -> list[int]:
    return [byte_ids[b] for b in text.encode("utf-8")]


def _stream(tokenizer, ids: Sequence[int], stop: Sequence[str] = ()) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer, stop)
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.finish())
    return deltas, detok


def _reference(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def test_byte_table_matches_tokenizer(tokenizer, byte_ids) -> None:
    assert len(set(byte_ids.values())) == 256
    assert tokenizer.decode(_bytes_as_ids("é日🚀", byte_ids)) == "é日🚀"


def test_random_ids_deltas_concatenate_to_decode(tokenizer) -> None:
    rng = random.Random(1234)
    for _ in range(400):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(0, 40))]
        detok = IncrementalDetokenizer(tokenizer)
        for n, token_id in enumerate(ids, start=1):
            detok.push(token_id)
            assert _reference(tokenizer, ids[:n]).startswith(detok.text)
        detok.finish()
        assert detok.text == _reference(tokenizer, ids)
        assert detok.token_ids == tuple(ids)


def test_random_bytes_deltas_concatenate_to_decode(tokenizer, byte_ids) -> None:
    """Mostly non-ASCII bytes: incomplete and invalid UTF-8 everywhere, long held runs."""
    rng = random.Random(99)
    for _ in range(300):
        ids = [byte_ids[rng.randrange(0x80, 0x100)] for _ in range(rng.randint(0, 60))]
        deltas, _ = _stream(tokenizer, ids)
        assert "".join(deltas) == _reference(tokenizer, ids)


def test_encoded_texts_round_trip(tokenizer) -> None:
    rng = random.Random(7)
    alphabet = "".join(CORPUS) + " \n"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(200)]
    for text in texts + CORPUS:
        deltas, _ = _stream(tokenizer, tokenizer.encode(text))
        assert "".join(deltas) == text


def test_multibyte_char_split_across_byte_tokens(tokenizer, byte_ids) -> None:
    assert _stream(tokenizer, _bytes_as_ids("é", byte_ids))[0] == ["", "é", ""]
    assert _stream(tokenizer, _bytes_as_ids("a🚀b", byte_ids))[0] == ["a", "", "", "", "🚀", "b", ""]


def test_finish_flushes_incomplete_char(tokenizer, byte_ids) -> None:
    deltas, detok = _stream(tokenizer, _bytes_as_ids("日", byte_ids)[:2])
    assert deltas == ["", "", "\ufffd"]
    assert detok.text == _reference(tokenizer, detok.token_ids)


def test_long_invalid_run_is_released_in_bounded_chunks(tokenizer, byte_ids) -> None:
    ids = [byte_ids[0xC3]] * 40 + [byte_ids[0xA9]]
    deltas, _ = _stream(tokenizer, ids)
    assert "".join(deltas) == "\ufffd" * 39 + "é"
    assert any(deltas[: 2 * detok_module._MAX_HELD_TOKENS])


def test_decode_window_stays_bounded(tokenizer, byte_ids) -> None:
    class CountingBackend:
        def __init__(self, inner) -> None:
            self.inner, self.longest = inner, 0

        def decode(self, ids, skip_special_tokens):
            self.longest = max(self.longest, len(ids))
            return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)

    rng = random.Random(5)
    detok = IncrementalDetokenizer(tokenizer)
    detok._leave_stream()  # the Python window; the Rust stream's is bounded by the held limit (below)
    detok._backend = backend = CountingBackend(tokenizer.backend_tokenizer)
    ids = [rng.randrange(len(tokenizer)) for _ in range(1500)] + [byte_ids[0xF0]] * 100
    for token_id in ids:
        detok.push(token_id)
    detok.finish()
    assert detok.text == _reference(tokenizer, ids)
    assert detok_module._MAX_HELD_TOKENS <= backend.longest <= 2 * detok_module._MAX_HELD_TOKENS + 2, backend.longest


def _python_window_stream(tokenizer, ids: Sequence[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer)
    detok._leave_stream()
    return [*(detok.push(i) for i in ids), detok.finish()]


def test_decode_stream_releases_what_the_python_window_releases(tokenizer, byte_ids) -> None:
    """Same deltas token by token, not only the same text: the offsets mirrored beside
    DecodeStream are the ones it moves, so handing over to Python mid-request is seamless."""
    rng = random.Random(31)
    for _ in range(300):
        if rng.random() < 0.5:
            ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(0, 50))]
        else:
            ids = [byte_ids[rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0x80, 0x100)])]
                   for _ in range(rng.randint(0, 50))]
        assert _stream(tokenizer, ids)[0] == _python_window_stream(tokenizer, ids), ids


def test_ordinary_text_stays_on_the_decode_stream(tokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer)
    for token_id in tokenizer.encode(" ".join(CORPUS)):
        detok.push(token_id)
    assert detok._stream is not None
    assert detok.text == " ".join(CORPUS)


def test_held_garbage_leaves_the_decode_stream_within_the_bound(tokenizer, byte_ids) -> None:
    detok = IncrementalDetokenizer(tokenizer)
    for n in range(detok_module._MAX_HELD_TOKENS + 1):
        assert detok._stream is not None, n
        detok.push(byte_ids[0xF0])
    assert detok._stream is None


def test_special_tokens_are_skipped(tokenizer) -> None:
    eos = tokenizer.eos_token_id
    ids = [eos, *tokenizer.encode("hi"), eos, *tokenizer.encode(" there"), eos]
    deltas, detok = _stream(tokenizer, ids)
    assert "".join(deltas) == "hi there"
    assert detok.token_ids == tuple(ids)


def test_stop_string_spanning_tokens(tokenizer, byte_ids) -> None:
    ids = _bytes_as_ids("Café crème brûlée", byte_ids)
    deltas, detok = _stream(tokenizer, ids, stop=["é c"])
    assert "".join(deltas) == detok.text == "Caf"
    assert detok.stopped
    assert detok.push(byte_ids[ord("x")]) == "" and detok.finish() == ""
    assert len(detok.token_ids) == len("Café c".encode())


def test_stop_string_with_merged_tokens(tokenizer) -> None:
    text = "hello world, the quick brown fox"
    ids = tokenizer.encode(text)
    assert len(ids) < len(text) and all("e qui" not in tokenizer.decode([i]) for i in ids)
    _, detok = _stream(tokenizer, ids, stop=["e qui"])
    assert detok.text == "hello world, th" and detok.stopped


def test_earliest_stop_string_wins(tokenizer) -> None:
    _, detok = _stream(tokenizer, tokenizer.encode("hello world"), stop=["world", "lo w"])
    assert detok.text == "hel"


def test_partial_stop_then_divergence_releases_held_text(tokenizer, byte_ids) -> None:
    deltas, detok = _stream(tokenizer, _bytes_as_ids("ab hello world", byte_ids), stop=["hello there"])
    assert deltas[:3] == ["a", "b", " "]
    assert deltas[3:9] == [""] * 6
    assert deltas[9] == "hello w"
    assert detok.text == "ab hello world" and not detok.stopped


def test_finish_flushes_held_stop_prefix(tokenizer, byte_ids) -> None:
    deltas, detok = _stream(tokenizer, _bytes_as_ids("abc hel", byte_ids), stop=["hello"])
    assert "".join(deltas[:-1]) == "abc "
    assert deltas[-1] == "hel"
    assert detok.text == "abc hel" and not detok.stopped


def test_empty_stop_string_is_rejected(tokenizer) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(tokenizer, stop=["ok", ""])
