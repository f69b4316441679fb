"""Tests for the chapter 01 checks: right answers pass, typical mistakes fail with a hint."""

from __future__ import annotations

import math
import re
from collections import Counter

import pytest

from tinylm.exercises import check, list_exercises, results
from tinylm.exercises.ch01 import (
    library_merges,
    reference_compression_ratio,
    reference_decode,
    reference_encode,
    reference_train_bpe,
    reference_unigram_bits_per_byte,
    text_chunks,
)
from tinylm.tokenizer import EOT, BPETokenizer

# ----------------------------------------------------------------- learner answers
# The notebook's solutions (written independently of the references), then typical mistakes.


def compression_ratio(text, tokenizer):
    return len(text.encode("utf-8")) / len(tokenizer.encode(text))


def compression_ratio_chars(text, tokenizer):  # wrong: characters, not bytes
    return len(text) / len(tokenizer.encode(text))


def compression_ratio_inverted(text, tokenizer):  # wrong: tokens per byte
    return len(tokenizer.encode(text)) / len(text.encode("utf-8"))


def decode(ids, merges):
    vocab = {i: bytes([i]) for i in range(256)}
    for i, (a, b) in enumerate(merges):
        vocab[256 + i] = vocab[a] + vocab[b]
    return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")


def decode_per_token(ids, merges):  # wrong: decodes each token's bytes on its own
    vocab = {i: bytes([i]) for i in range(256)}
    for i, (a, b) in enumerate(merges):
        vocab[256 + i] = vocab[a] + vocab[b]
    return "".join(vocab[i].decode("utf-8", errors="replace") for i in ids)


def _merge(ids, pair, new_id):
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == tuple(pair):
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def encode(text, merges):
    # one pass per merge, in the order learned: equivalent to "lowest rank first"
    ids = list(text.encode("utf-8"))
    for i, pair in enumerate(merges):
        ids = _merge(ids, pair, 256 + i)
    return ids


def encode_reverse_order(text, merges):  # wrong: the last-learned merge first
    ids = list(text.encode("utf-8"))
    for i in reversed(range(len(merges))):
        ids = _merge(ids, merges[i], 256 + i)
    return ids


def unigram_bits_per_byte(ids, n_bytes):
    counts = Counter(int(i) for i in ids)
    n = len(ids)
    return -sum(c * math.log2(c / n) for c in counts.values()) / n_bytes


def unigram_nats(ids, n_bytes):  # wrong: natural log
    counts = Counter(int(i) for i in ids)
    n = len(ids)
    return -sum(c * math.log(c / n) for c in counts.values()) / n_bytes


def unigram_per_token(ids, n_bytes):  # wrong: bits per token
    counts = Counter(int(i) for i in ids)
    n = len(ids)
    return -sum(c * math.log2(c / n) for c in counts.values()) / n


def unigram_no_int(ids, n_bytes):  # wrong for tensors: tensor elements hash by identity
    counts = Counter(ids)
    n = len(ids)
    return -sum(c * math.log2(c / n) for c in counts.values()) / n_bytes


def stub(*args):
    raise NotImplementedError


# ----------------------------------------------------------------- pass / fail / not attempted


@pytest.mark.parametrize(
    ("exercise_id", "answer"),
    [
        ("ch01.compression_ratio", compression_ratio),
        ("ch01.compression_ratio", reference_compression_ratio),
        ("ch01.decode", decode),
        ("ch01.decode", reference_decode),
        ("ch01.encode", encode),
        ("ch01.encode", reference_encode),
        ("ch01.unigram_bits_per_byte", unigram_bits_per_byte),
        ("ch01.unigram_bits_per_byte", reference_unigram_bits_per_byte),
    ],
)
def test_correct_answers_pass(exercise_id, answer, exercise):
    exercise.passes(exercise_id, answer)


@pytest.mark.parametrize(
    ("exercise_id", "answer", "fragment"),
    [
        ("ch01.compression_ratio", compression_ratio_chars, "UTF-8 bytes"),
        ("ch01.compression_ratio", compression_ratio_inverted, "tokens per byte"),
        ("ch01.decode", decode_per_token, "decode once at the end"),
        ("ch01.encode", encode_reverse_order, "order they were learned"),
        ("ch01.unigram_bits_per_byte", unigram_nats, "nats"),
        ("ch01.unigram_bits_per_byte", unigram_per_token, "bits per token"),
    ],
)
def test_wrong_answers_fail_with_a_targeted_hint(exercise_id, answer, fragment, exercise):
    exercise.fails(
        exercise_id, answer, f"{answer.__name__}(", " gave ", "expected", "Hint:", fragment
    )


def test_unigram_check_catches_tensor_ids_counted_by_identity():
    assert check("ch01.unigram_bits_per_byte", unigram_no_int) is False
    message = results()[-1].message
    assert "torch tensor" in message and "int(i)" in message


@pytest.mark.parametrize(
    "exercise_id",
    ["ch01.compression_ratio", "ch01.decode", "ch01.encode", "ch01.unigram_bits_per_byte"],
)
def test_stub_is_not_attempted(exercise_id, exercise):
    exercise.not_attempted(exercise_id, stub)


def test_chapter_has_every_difficulty():
    ch01 = list_exercises(1)
    assert {ex.difficulty for ex in ch01} == {"warm-up", "core", "stretch"}
    assert len(ch01) >= 3


# ----------------------------------------------------------------- references agree with lib


@pytest.mark.parametrize(
    "text",
    ["aaabdaaabac", "the cat and the hat and the bat", "café crêpe naïve café crêpe", "ab" * 20],
)
def test_reference_encode_and_decode_match_the_tokenizer(text):
    # One chunk and no special tokens: the pattern "(?s).+" keeps the whole text together.
    tok = BPETokenizer.train(text, vocab_size=256 + 5, pattern=r"(?s).+", special_tokens=())
    ids = reference_encode(text, tok.merges)
    assert ids == tok.encode(text)
    assert reference_decode(ids, tok.merges) == text == tok.decode(ids)


def test_reference_unigram_on_a_tiny_case():
    # two equally likely tokens: 1 bit each, 4 bits over 8 bytes
    assert reference_unigram_bits_per_byte([1, 1, 2, 2], 8) == pytest.approx(0.5)
    assert reference_unigram_bits_per_byte([7] * 5, 10) == 0.0


def test_compression_check_uses_non_ascii_text():
    # the check's cases must tell bytes from characters apart
    from tinylm.exercises.ch01 import _tokenizer

    text = "The café was closed. Pip ate a crêpe 🙂"
    assert len(text.encode("utf-8")) != len(text)
    assert re.search("[^\x00-\x7f]", text)
    assert compression_ratio(text, _tokenizer()) != compression_ratio_chars(text, _tokenizer())


# ----------------------------------------------------------------- the BPE training loop


def train_bpe(chunks, n_merges):
    """The notebook's loop, written independently of the reference."""
    merges = []
    for i in range(n_merges):
        counts = Counter(p for ids in chunks for p in zip(ids, ids[1:], strict=False))
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        chunks = [_merge(ids, best, 256 + i) for ids in chunks]
        merges.append(best)
    return merges


def train_bpe_first_seen_ties(chunks, n_merges):  # wrong: Counter.most_common keeps the first
    merges = []
    for i in range(n_merges):
        counts = Counter(p for ids in chunks for p in zip(ids, ids[1:], strict=False))
        if not counts:
            break
        best = counts.most_common(1)[0][0]
        chunks = [_merge(ids, best, 256 + i) for ids in chunks]
        merges.append(best)
    return merges


def train_bpe_across_chunks(chunks, n_merges):  # wrong: joins the chunks before counting
    return train_bpe([[i for ids in chunks for i in ids]], n_merges)


def train_bpe_no_skip(chunks, n_merges):  # wrong: after a merge, moves on by one token only
    def merge(ids, pair, new_id):
        out, i = [], 0
        while i < len(ids):
            if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
                out.append(new_id)
            else:
                out.append(ids[i])
            i += 1
        return out

    merges = []
    for i in range(n_merges):
        counts = Counter(p for ids in chunks for p in zip(ids, ids[1:], strict=False))
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        chunks = [merge(ids, best, 256 + i) for ids in chunks]
        merges.append(best)
    return merges


def train_bpe_never_stops(chunks, n_merges):  # wrong: max() of an empty Counter raises
    merges = []
    for i in range(n_merges):
        counts = Counter(p for ids in chunks for p in zip(ids, ids[1:], strict=False))
        best = min(counts, key=lambda p: (-counts[p], p))
        chunks = [_merge(ids, best, 256 + i) for ids in chunks]
        merges.append(best)
    return merges


def test_train_bpe_right_answers_pass(exercise):
    exercise.passes("ch01.train_bpe", train_bpe)
    exercise.passes("ch01.train_bpe", reference_train_bpe)


@pytest.mark.parametrize(
    ("answer", "fragment"),
    [
        (train_bpe_first_seen_ties, "LOWEST pair"),
        (train_bpe_across_chunks, "inside each chunk only"),
        (train_bpe_no_skip, "move past both of its tokens"),
    ],
)
def test_train_bpe_typical_mistakes_get_their_hint(answer, fragment, exercise):
    exercise.fails("ch01.train_bpe", answer, "merge ", "the library learns", "Hint:", fragment)


def test_train_bpe_that_never_stops_names_the_input(exercise):
    exercise.fails(
        "ch01.train_bpe", train_bpe_never_stops, "'x y x y x y'", "raised", "no pair is left"
    )


def test_train_bpe_stub_is_not_attempted(exercise):
    exercise.not_attempted("ch01.train_bpe", stub)


def test_reference_bpe_loop_learns_the_library_merges_on_stories():
    from tinylm.stories import generate_stories

    text = "".join(story + EOT for story, _ in generate_stories(15, seed=3))
    assert reference_train_bpe(text_chunks(text), 80) == library_merges(text, 80)
