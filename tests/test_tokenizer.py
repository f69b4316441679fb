"""Tests for tinylm.tokenizer: byte-level BPE training, encoding, special tokens, files."""

from __future__ import annotations

import json
import random
import re
import string
from collections import Counter
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinylm import tokenizer as tokenizer_module
from tinylm.tokenizer import EOT, PATTERNS, BPETokenizer

try:  # only for comparing our patterns with the originals
    import regex
except ImportError:
    regex = None

# --------------------------------------------------------------------- helpers


def small_corpus(n_words: int = 3000, seed: int = 0) -> str:
    """About 20 KB of text: Zipf-distributed words, punctuation, numbers, accents, emoji, EOTs."""
    rng = random.Random(seed)
    common = (
        "the a and to was she he it they said once upon time little girl boy dog cat "
        "ball tree park happy sad big red blue ran played found looked Lily Max Tom "
        "don't it's I've we'll café naïve über Zoë 🙂 🐶 42 1999 3.14 snake_case x2"
    ).split()
    syllables = [c + v for c in "bdklmnprst" for v in ("a", "e", "i", "o", "u", "ou")]
    made_up = sorted({"".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(400)})
    words = common + made_up
    weights = [1.0 / (i + 1) for i in range(len(words))]  # Zipf's law, as in real text
    out = []
    for i, word in enumerate(rng.choices(words, weights, k=n_words)):
        r = rng.random()
        punct = "." if r < 0.08 else "," if r < 0.12 else "!\n" if r < 0.14 else ""
        out.append(word + punct + (EOT if i % 300 == 299 else " "))
    return "".join(out)


def naive_merges(text: str, n_merges: int, pattern: str) -> list[tuple[int, int]]:
    """Reference BPE: recount every pair from scratch before each merge (slow, obviously right)."""
    chunk_counts: Counter[str] = Counter()
    for part in text.split(EOT):
        chunk_counts.update(re.findall(pattern, part))
    seqs = {chunk: list(chunk.encode("utf-8")) for chunk in chunk_counts}
    merges: list[tuple[int, int]] = []
    for i in range(n_merges):
        counts: Counter[tuple[int, int]] = Counter()
        for chunk, seq in seqs.items():
            for pair in pairwise(seq):
                counts[pair] += chunk_counts[chunk]
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))  # most frequent, then lowest pair
        merges.append(best)
        for chunk, seq in seqs.items():
            out, j = [], 0
            while j < len(seq):
                if j + 1 < len(seq) and (seq[j], seq[j + 1]) == best:
                    out.append(256 + i)
                    j += 2
                else:
                    out.append(seq[j])
                    j += 1
            seqs[chunk] = out
    return merges


@pytest.fixture(scope="module")
def corpus() -> str:
    return small_corpus()


@pytest.fixture(scope="module")
def tokenizers(corpus: str) -> dict[str, BPETokenizer]:
    return {name: BPETokenizer.train(corpus, 256 + 200 + 1, pattern=name) for name in PATTERNS}


# ------------------------------------------------------ tiny, hand-checked cases


def test_wikipedia_example() -> None:
    # https://en.wikipedia.org/wiki/Byte_pair_encoding: aa -> Z, ab -> Y, ZY -> X.
    # After aa -> Z the text is ZabdZabac, where "Za" and "ab" tie at 2: the
    # lower pair (97, 98) = "ab" wins, as on Wikipedia.
    tok = BPETokenizer.train("aaabdaaabac", vocab_size=256 + 3 + 1)
    assert tok.merges == [(97, 97), (97, 98), (256, 257)]
    assert tok.vocab_size == 260
    assert tok.eot_id == 259
    assert tok.token_bytes(258) == b"aaab"
    assert tok.encode("aaabdaaabac") == [258, ord("d"), 258, ord("a"), ord("c")]
    assert tok.decode([258, ord("d")]) == "aaabd"


def test_ties_go_to_the_lowest_pair() -> None:
    # All pairs of "abcd" occur once: ab first; then (256, c) vs (c, d): cd is lower.
    tok = BPETokenizer.train("abcd", vocab_size=256 + 3, special_tokens=())
    assert tok.merges == [(97, 98), (99, 100), (256, 257)]
    assert tok.encode("abcd") == [258]


def test_merges_stay_inside_chunks() -> None:
    # "ab ab ab": chunks "ab", " ab", " ab". "b " never forms a pair.
    tok = BPETokenizer.train("ab ab ab", vocab_size=256 + 2, special_tokens=())
    assert tok.merges == [(97, 98), (32, 256)]
    assert tok.encode("ab ab") == [256, 257]


def test_pattern_splits_by_hand() -> None:
    text = "I've 12345 dogs!!\n\n  ok"
    assert re.findall(PATTERNS["whitespace"], text) == ["I've", " 12345", " dogs!!", "\n\n ", " ok"]
    assert re.findall(PATTERNS["gpt2"], text) == [
        "I",
        "'ve",
        " 12345",
        " dogs",
        "!!",
        "\n\n ",
        " ok",
    ]
    assert re.findall(PATTERNS["gpt4"], text) == [
        "I", "'ve", " ", "123", "45", " dogs", "!!\n\n", " ", " ok"
    ]  # fmt: skip
    assert re.findall(PATTERNS["gpt2"], "snake_case") == ["snake", "_", "case"]
    assert re.findall(PATTERNS["gpt4"], "snake_case") == ["snake", "_case"]


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_incremental_training_matches_naive_recount(corpus: str, pattern: str) -> None:
    n_merges = 300
    tok = BPETokenizer.train(corpus, 256 + n_merges + 1, pattern=pattern)
    assert len(tok.merges) == n_merges  # the corpus has enough pairs
    assert tok.merges == naive_merges(corpus, n_merges, PATTERNS[pattern])


def test_training_is_deterministic(corpus: str) -> None:
    a = BPETokenizer.train(corpus, 400, pattern="gpt4")
    b = BPETokenizer.train(corpus, 400, pattern="gpt4")
    assert a.merges == b.merges


def test_vocab_size_counts_bytes_merges_and_specials(corpus: str) -> None:
    tok = BPETokenizer.train(corpus, 300, special_tokens=(EOT, "<|pad|>"))
    assert tok.vocab_size == len(tok) == 300 == 256 + len(tok.merges) + 2
    assert tok.special_tokens == {EOT: 298, "<|pad|>": 299}
    assert tok.eot_id == 298  # the first special token
    assert BPETokenizer.train(corpus, 300, special_tokens=()).eot_id is None


def test_special_tokens_are_never_merged_across() -> None:
    # Cut at the EOTs, the text is "ab", 19 x "cdab", "cd": ab and cd occur 20
    # times (tie: ab is lower), then (cd)(ab) 19 times. No pair touches the EOT.
    tok = BPETokenizer.train(("ab" + EOT + "cd") * 20, vocab_size=256 + 3 + 1)
    assert tok.merges == [(97, 98), (99, 100), (257, 256)]
    assert tok.encode("cdab" + EOT) == [258, tok.eot_id]


def test_training_stops_early_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="ran out of pairs"):
        tok = BPETokenizer.train("abab", vocab_size=1000)
    assert tok.merges == [(97, 98), (256, 256)]
    assert tok.vocab_size == 256 + 2 + 1


def test_training_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="vocab_size=200 is too small.*>= 257"):
        BPETokenizer.train("abc", 200)
    with pytest.raises(TypeError, match="decode bytes first"):
        BPETokenizer.train(b"abc", 300)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not one string"):
        BPETokenizer.train("abc", 300, special_tokens=EOT)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="duplicates"):
        BPETokenizer.train("abc", 300, special_tokens=(EOT, EOT))
    with pytest.raises(ValueError, match="non-capturing"):
        BPETokenizer.train("abc", 300, pattern=r"(\w+)|\s+")
    with pytest.raises(ValueError, match="neither a known name"):
        BPETokenizer.train("abc", 300, pattern="gpt5[")


# ---------------------------------------------------------------- encoding


def test_special_tokens_in_text(tokenizers: dict[str, BPETokenizer]) -> None:
    tok = tokenizers["gpt4"]
    ids = tok.encode(f"Once upon a time.{EOT}The end.")
    assert ids.count(tok.eot_id) == 1
    assert tok.decode(ids) == f"Once upon a time.{EOT}The end."
    plain = tok.encode_ordinary(EOT)  # spelled out in ordinary tokens
    assert tok.eot_id not in plain and tok.decode(plain) == EOT


def test_longest_special_token_wins() -> None:
    tok = BPETokenizer(special_tokens=("<|a|>", "<|a|><|b|>"))
    assert tok.encode("x<|a|><|b|>y<|a|>") == [ord("x"), 257, ord("y"), 256]


def test_cache_does_not_change_results(
    tokenizers: dict[str, BPETokenizer], corpus: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tok = tokenizers["whitespace"]
    expected = BPETokenizer.from_dict(tok.to_dict()).encode(corpus)  # fresh, empty cache
    assert tok.encode(corpus) == expected
    assert tok.encode(corpus) == expected  # now from the cache
    monkeypatch.setattr(tokenizer_module, "_CACHE_MAX", 3)  # cache emptied again and again
    assert BPETokenizer.from_dict(tok.to_dict()).encode(corpus) == expected


def test_custom_pattern_that_skips_characters_still_round_trips() -> None:
    # [a-z]+ matches only letters; the rest becomes chunks of its own.
    tok = BPETokenizer.train("hello, world! hello?", 256 + 10 + 1, pattern="[a-z]+")
    assert tok.pattern_name is None
    assert tok.decode(tok.encode("hello, world! 🙂")) == "hello, world! 🙂"


def test_decode_accepts_arrays_and_rejects_bad_ids(tokenizers: dict[str, BPETokenizer]) -> None:
    np = pytest.importorskip("numpy")
    tok = tokenizers["gpt2"]
    ids = tok.encode("the little dog")
    assert tok.decode(np.array(ids)) == "the little dog"
    assert tok.decode(iter(ids)) == "the little dog"
    for bad in (-1, tok.vocab_size):
        with pytest.raises(ValueError, match=f"token id {bad} is out of range"):
            tok.decode([1, bad])


def test_pieces_for_learners(tokenizers: dict[str, BPETokenizer]) -> None:
    tok = tokenizers["gpt4"]
    assert "".join(tok.tokenize("the little dog")) == "the little dog"
    assert tok.id_to_piece(tok.eot_id) == EOT
    assert tok.id_to_piece(0xF0) == "\ufffd"  # first byte of a 4-byte character alone
    assert tok.token_bytes(0xF0) == b"\xf0"
    with pytest.raises(ValueError, match="out of range"):
        tok.token_bytes(tok.vocab_size)


def test_lone_surrogate_gives_a_clear_error(tokenizers: dict[str, BPETokenizer]) -> None:
    with pytest.raises(ValueError, match="lone surrogate.*position 2"):
        tokenizers["gpt2"].encode("ab\ud800cd")


# ------------------------------------------------------------ properties

# Arbitrary text (hypothesis leaves out surrogates by default) mixed with the
# pieces most likely to break things: special tokens, multi-code-point emoji,
# CRLF, runs of spaces, contractions.
tricky = st.sampled_from([EOT, "<|", "🙂", "👩‍👩‍👧", "\r\n", "  ", "\t", "'s", "_", "é", "ﬁ"])
texts = st.lists(st.one_of(st.text(), tricky), max_size=12).map("".join)


@settings(max_examples=150, deadline=None)
@given(text=texts)
def test_round_trip(tokenizers: dict[str, BPETokenizer], text: str) -> None:
    for tok in tokenizers.values():
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode_ordinary(text)) == text


@settings(max_examples=150, deadline=None)
@given(text=texts)
def test_patterns_cover_all_text(text: str) -> None:
    for regex in PATTERNS.values():
        assert "".join(re.findall(regex, text)) == text


ORIGINALS = {  # the GPT-2 and GPT-4 patterns as written for the `regex` package
    "gpt2": r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
    "gpt4": r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"
    r"|\s*[\r\n]|\s+(?!\S)|\s+",
}


@pytest.mark.skipif(regex is None, reason="the `regex` package is not installed")
@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet=string.printable + "éÉüßñçøå’«»—…", max_size=60))
def test_patterns_split_like_the_originals(text: str) -> None:
    for name, original in ORIGINALS.items():
        assert re.findall(PATTERNS[name], text) == regex.findall(original, text)


# ------------------------------------------------------------ save / load


def test_save_load_round_trip(tokenizers: dict[str, BPETokenizer], corpus: str, tmp_path) -> None:
    for name, tok in tokenizers.items():
        path = tok.save(tmp_path / "sub" / f"{name}.json")
        loaded = BPETokenizer.load(path)
        assert loaded.merges == tok.merges
        assert loaded.pattern == tok.pattern and loaded.pattern_name == name
        assert loaded.special_tokens == tok.special_tokens
        assert loaded.encode(corpus) == tok.encode(corpus)
        d = json.loads(path.read_text(encoding="utf-8"))
        assert d["format"] == "tinylm-bpe" and d["version"] == 1
        assert d["merges"][0] == list(tok.merges[0])
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == [
        "gpt2.json",
        "gpt4.json",
        "whitespace.json",
    ]  # fmt: skip  (no temporary files left behind)


def test_failed_save_keeps_the_old_file(
    tokenizers: dict[str, BPETokenizer], tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tokenizers["gpt2"].save(tmp_path / "tok.json")
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tokenizer_module.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        tokenizers["gpt4"].save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["tok.json"]


def _write(tmp_path, content: str):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    return path


def test_load_missing_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no tokenizer file at .*nope.json.*train"):
        BPETokenizer.load(tmp_path / "nope.json")


def test_load_truncated_file(tokenizers: dict[str, BPETokenizer], tmp_path) -> None:
    text = tokenizers["gpt2"].save(tmp_path / "tok.json").read_text(encoding="utf-8")
    path = _write(tmp_path, text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"bad\.json is not valid JSON.*truncated.*fix"):
        BPETokenizer.load(path)


@pytest.mark.parametrize(
    "content, problem",
    [
        ('{"model": {"type": "BPE"}}', "not a tinylm tokenizer"),  # e.g. a Hugging Face file
        ("[1, 2, 3]", "not a tinylm tokenizer"),
        ('{"format": "tinylm-bpe", "version": 99}', "version 99.*reads version 1"),
        ('{"format": "tinylm-bpe", "version": 1, "pattern": null}', "lacks the field"),
        (
            '{"format": "tinylm-bpe", "version": 1, "pattern": null, "special_tokens": [],'
            ' "merges": []}',
            "inconsistent: pattern must be a regex string",
        ),
    ],
)
def test_load_wrong_kind_of_file(tmp_path, content: str, problem: str) -> None:
    with pytest.raises(ValueError, match=rf"bad\.json .*{problem}.*fix"):
        BPETokenizer.load(_write(tmp_path, content))


@pytest.mark.parametrize(
    "merges, problem",
    [
        ([[97, 98], [300, 97]], "merge 1 is \\[300, 97\\].*0..256"),  # refers to a later token
        ([[97, 98], [97, 98]], "repeats an earlier merge"),
        ([[97, 98, 99]], "pairs"),
        ([[97, "b"]], "merge 0"),
        ("97 98", "pairs"),
    ],
)
def test_load_inconsistent_merges(tmp_path, merges, problem: str) -> None:
    d = {"format": "tinylm-bpe", "version": 1, "pattern": "gpt2", "special_tokens": [EOT]}
    path = _write(tmp_path, json.dumps({**d, "merges": merges}))
    with pytest.raises(ValueError, match=rf"bad\.json is inconsistent: .*{problem}.*fix"):
        BPETokenizer.load(path)


def test_load_vocab_size_mismatch(tokenizers: dict[str, BPETokenizer], tmp_path) -> None:
    d = tokenizers["gpt2"].to_dict()
    d["vocab_size"] += 1
    with pytest.raises(ValueError, match="says vocab_size=.*but its merges"):
        BPETokenizer.load(_write(tmp_path, json.dumps(d)))
