"""Checks for notebook 01, "Text to tokens".

The inputs are chosen so that the typical mistakes give a different answer: breaking ties
between equally frequent pairs some other way than the library, counting pairs across
chunk boundaries, merging overlapping pairs, counting characters instead of UTF-8 bytes,
decoding each token on its own (which breaks a character whose bytes straddle two tokens),
applying merges in the wrong order, and measuring a loss in nats or per token instead of
bits per byte.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from functools import cache
from itertools import pairwise
from typing import Any

from tinylm.course.exercises.core import Fail, call, check_cases, exercise, expect_close, unseen
from tinylm.tokenizer import EOT, PATTERNS, BPETokenizer

# --------------------------------------------------------------------------- shared inputs

# A small training text for the tokenizer the warm-up hands to the learner's function: a
# few repeated sentences (so BPE finds real words to merge) and some non-ASCII characters.
_TRAIN_TEXT = (
    "Once upon a time, a little fox named Pip lived in a den by the river. "
    "Pip had a red ball. Pip loved the red ball very much. "
    "One sunny morning, Pip took the ball to the park. The café was closed. "
) * 8 + "<|endoftext|>"


@cache
def _tokenizer() -> Any:
    """A small BPETokenizer trained on _TRAIN_TEXT (cached: it is the same for every check)."""
    return BPETokenizer.train(_TRAIN_TEXT, vocab_size=256 + 60 + 1)


# --------------------------------------------------------------------------- warm-up


def reference_compression_ratio(text: str, tokenizer: Any) -> float:
    """Bytes of UTF-8 text per token: how much text each token carries on average."""
    return len(text.encode("utf-8")) / len(tokenizer.encode(text))


def _compression_hint(got: Any, expected: Any, args: Any) -> str:
    text, tok = args
    n_tokens = len(tok.encode(text))
    if math.isclose(float(got), len(text) / n_tokens, rel_tol=1e-9):
        return (
            "you counted characters; count UTF-8 bytes instead (len(text.encode('utf-8'))): "
            "'é' is 1 character but 2 bytes, '🙂' is 4 bytes"
        )
    if math.isclose(float(got), 1 / expected, rel_tol=1e-9):
        return "that is tokens per byte; the compression ratio is bytes per token"
    if math.isclose(float(got), len(text.encode("utf-8")) / len(tok.encode_ordinary(text)), rel_tol=1e-9):  # fmt: skip
        return (
            "use tokenizer.encode(text): it turns '<|endoftext|>' into its single special "
            "token, while encode_ordinary spells it out in bytes"
        )
    return "bytes per token = len(text.encode('utf-8')) / len(tokenizer.encode(text))"


@exercise(
    "ch01.compression_ratio", difficulty="warm-up", title="Compression ratio: bytes per token"
)
def _check_compression_ratio(answer: Any) -> str:
    tok = _tokenizer()
    texts = [
        "Pip had a red ball.",
        "The café was closed. Pip ate a crêpe 🙂",
        "One sunny morning, Pip took the ball to the park.<|endoftext|>",
        "Zebras quietly juggle xylophones.",
    ]
    words = _TRAIN_TEXT.split() + ["crêpe", "🙂", "Zebras", EOT]
    texts += unseen(lambda r: " ".join(r.choice(words) for _ in range(r.randint(2, 12))))
    cases = [((text, tok), reference_compression_ratio(text, tok)) for text in texts]
    return check_cases(answer, cases, rel=1e-9, hint=_compression_hint)


# --------------------------------------------------------------------------- core: BPE training


def text_chunks(text: str) -> list[list[int]]:
    """Cut ``text`` like the library does before training: at <|endoftext|>, then with the
    default pre-split pattern; each chunk becomes the list of its UTF-8 bytes."""
    split = re.compile(PATTERNS["whitespace"])
    return [list(c.encode("utf-8")) for part in text.split(EOT) for c in split.findall(part)]


def _merge_pair(ids: list[int], pair: tuple[int, int], new_id: int, skip: bool = True) -> list[int]:
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2 if skip else 1  # skip=False: the overlapping-merge mistake
        else:
            out.append(ids[i])
            i += 1
    return out


def _bpe_variant(
    chunks: Sequence[Sequence[int]],
    n_merges: int,
    *,
    tie: str = "lowest",
    flatten: bool = False,
    skip: bool = True,
    distinct: bool = False,
    first_id: int = 256,
) -> list[tuple[int, int]]:
    """The naive BPE loop, with switches for the typical mistakes (defaults: the right one)."""
    work = [list(c) for c in chunks]
    if flatten:  # the mistake: pairs across chunk boundaries count too
        work = [[i for c in work for i in c]]
    merges: list[tuple[int, int]] = []
    for k in range(n_merges):
        counts: Counter = Counter()
        for ids in work:
            counts.update(set(pairwise(ids)) if distinct else pairwise(ids))
        if not counts:
            break  # every chunk is a single token: nothing left to merge
        if tie == "lowest":
            best = min(counts, key=lambda p: (-counts[p], p))
        elif tie == "highest":
            best = max(counts, key=lambda p: (counts[p], p))
        else:  # "first": max() keeps the first of equally frequent pairs it meets
            best = max(counts, key=counts.__getitem__)
        work = [_merge_pair(ids, best, first_id + k, skip) for ids in work]
        merges.append(best)
    return merges


def reference_train_bpe(chunks: Sequence[Sequence[int]], n_merges: int) -> list[tuple[int, int]]:
    """Learn up to ``n_merges`` BPE merges from pre-split chunks of byte ids, naively.

    Repeat: count every adjacent pair inside each chunk (overlapping pairs count, e.g. three
    in "aaaa"), take the most frequent (ties: the lowest pair), replace it left to right in
    every chunk by the next id (256, 257, ...). Stop early when no pair is left. The same
    merges as `tinylm.tokenizer.BPETokenizer.train`, which gets them much faster.
    """
    return _bpe_variant(chunks, n_merges)


def library_merges(text: str, n_merges: int) -> list[tuple[int, int]]:
    """The merges `BPETokenizer.train` learns from ``text`` with room for ``n_merges``."""
    with warnings.catch_warnings():  # running out of pairs is part of some cases
        warnings.simplefilter("ignore")
        return BPETokenizer.train(text, vocab_size=256 + n_merges + 1).merges


_BPE_MISTAKES = [
    (
        dict(tie="first"),
        "when two pairs are equally frequent, take the LOWEST pair (a, b), as the library "
        "does: min(counts, key=lambda p: (-counts[p], p)); max(counts, key=counts.get) and "
        "most_common(1) keep whichever pair they met first",
    ),
    (
        dict(tie="highest"),
        "ties go to the lowest pair, not the highest: min(counts, key=lambda p: (-counts[p], p))",
    ),
    (
        dict(flatten=True),
        "count pairs inside each chunk only: joining the chunks counts pairs across word "
        "boundaries (the end of one word and the start of the next) that BPE never merges",
    ),
    (
        dict(skip=False),
        "after replacing a pair, move past both of its tokens (i += 2): otherwise the "
        "pair's second token stays in the list next to the new one",
    ),
    (
        dict(distinct=True),
        "count every occurrence of a pair: a pair that occurs twice in one chunk counts twice",
    ),
    (
        dict(first_id=257),
        "merge i makes token 256 + i (the first merge is 256): number the new tokens from 256",
    ),
]


def _bpe_hint(got: Any, expected: Any, args: Any) -> str | None:
    chunks, n = args
    for options, hint in _BPE_MISTAKES:
        variant = _bpe_variant(chunks, n, **options)
        if variant != expected and got == variant:
            return hint
    if len(got) > len(expected):
        return "stop when no pair is left to merge (the pair counts are empty)"
    return (
        "repeat n_merges times: count adjacent pairs in every chunk, pick the most frequent "
        "(ties: lowest pair), replace it everywhere by 256 + i, remember the merge"
    )


def _describe_merge(merges: Sequence[tuple[int, int]], k: int) -> str:
    """Merge k of a merge list, with the bytes its two parts stand for."""
    vocab = [bytes([i]) for i in range(256)]
    for a, b in merges[:k]:
        vocab.append(vocab[a] + vocab[b] if max(a, b) < len(vocab) else b"?")
    a, b = merges[k]
    parts = [repr(vocab[i]) if 0 <= i < len(vocab) else f"<unknown id {i}>" for i in (a, b)]
    return f"({a}, {b}) = {parts[0]} + {parts[1]}"


_BPE_CASES = [
    ("cd cd ab ab", 2),  # a tie: (a, b) and (c, d) twice each; the lowest pair goes first
    ("x y x y x y", 3),  # the pairs that join two words are the most frequent ones
    ("aaaaa aaa bc bc bc", 3),  # overlapping pairs: 'aaaaa' holds (a, a) four times
    ("hello hello help", 20),  # runs out of pairs after a few merges
    (
        "Pip had a red ball. Pip loved the red ball very much." + EOT + "Tom had a kite.",
        25,
    ),
    (_TRAIN_TEXT, 40),  # repeated story sentences with 'é' in them
]


def _bpe_case(r: Any) -> tuple[str, int]:
    """A random text of short words and a number of merges, for the unseen inputs."""
    words = ("ab", "cd", "Pip", "red", "ball", "café", "aaa", "the", "x")
    return " ".join(r.choice(words) for _ in range(r.randint(3, 30))), r.randint(1, 15)


@exercise("ch01.train_bpe", difficulty="core", title="The BPE training loop")
def _check_train_bpe(answer: Any) -> str:
    name = getattr(answer, "__name__", "your function")
    for text, n in _BPE_CASES + unseen(_bpe_case, n=2):
        chunks = text_chunks(text)
        expected = library_merges(text, n)
        what = f"{name}(chunks of {text[:30]!r}{'...' if len(text) > 30 else ''}, {n})"
        try:
            got = call(answer, [list(c) for c in chunks], n)  # copies: the check reuses chunks
        except Fail as failure:
            hint = failure.hint
            if hint is None and "empty" in failure.message:
                hint = "stop when no pair is left to merge (the pair counts are empty)"
            raise Fail(f"on the chunks of {text[:30]!r}: {failure.message}", hint) from None
        try:
            got = [tuple(int(i) for i in pair) for pair in got]
        except (TypeError, ValueError):
            raise Fail(
                f"{what} returned {got!r:.80}; expected a list of merges (a, b)",
                hint="return the list of pairs you merged, in order: [(a, b), ...]",
            ) from None
        if got == expected:
            continue
        hint = _bpe_hint(got, expected, (chunks, n))
        k = next((i for i, (g, e) in enumerate(zip(got, expected, strict=False)) if g != e), None)
        if k is None:
            raise Fail(
                f"{what} returned {len(got)} merges; the library learns {len(expected)} "
                "(the first ones agree)",
                hint,
            )
        agree = f" (merges 0..{k - 1} agree)" if k else ""
        raise Fail(
            f"{what}: merge {k} (token {256 + k}) is {_describe_merge(got, k)}; the library "
            f"learns {_describe_merge(expected, k)}{agree}",
            hint,
        )
    return f"all {len(_BPE_CASES)} texts give the library's merges, merge for merge"


# --------------------------------------------------------------------------- core: decode


def reference_decode(ids: Sequence[int], merges: Sequence[tuple[int, int]]) -> str:
    """Decode token ids to text, given the merges (merge i made token 256 + i)."""
    vocab = [bytes([i]) for i in range(256)]
    for a, b in merges:
        vocab.append(vocab[a] + vocab[b])
    data = b"".join(vocab[i] for i in ids)
    return data.decode("utf-8", errors="replace")


def _decode_per_token(ids: Sequence[int], merges: Sequence[tuple[int, int]]) -> str:
    """The typical mistake: decode each token's bytes on its own, then join the strings."""
    vocab = [bytes([i]) for i in range(256)]
    for a, b in merges:
        vocab.append(vocab[a] + vocab[b])
    return "".join(vocab[i].decode("utf-8", errors="replace") for i in ids)


def _decode_hint(got: Any, expected: Any, args: Any) -> str:
    if got == _decode_per_token(*args):
        return (
            "join the bytes of all the tokens first and decode once at the end: a character "
            "such as 'é' (2 bytes) can be split over two tokens, and each half alone is not "
            "valid UTF-8"
        )
    return (
        "build the table token id -> bytes (ids 0..255 are single bytes, merge i makes "
        "256 + i from the bytes of its two parts), join the bytes of the ids, then "
        "decode('utf-8', errors='replace')"
    )


@exercise("ch01.decode", difficulty="core", title="Decode token ids with the merges")
def _check_decode(answer: Any) -> str:
    # merges: 256 = "h"+"e", 257 = "he"+"l", 258 = "l"+"o", 259 = 0xC3 + 0xA9 ("é", 2 bytes)
    merges = [(104, 101), (256, 108), (108, 111), (0xC3, 0xA9)]
    cases = [
        (([257, 258], merges), "hello"),
        (([104, 105, 33], merges), "hi!"),
        (([99, 97, 102, 259], merges), "café"),
        # "é" as two separate byte tokens: only decoding the joined bytes gives it back
        (([99, 97, 102, 0xC3, 0xA9], merges), "café"),
        # a lone continuation byte is not valid UTF-8: it becomes U+FFFD
        (([104, 0xA9], merges), "h\ufffd"),
        (([], merges), ""),
    ]
    for ids in unseen(lambda r: [r.randrange(256 + len(merges)) for _ in range(r.randint(1, 12))]):
        cases.append(((ids, merges), reference_decode(ids, merges)))
    return check_cases(answer, cases, exact=True, hint=_decode_hint)


# --------------------------------------------------------------------------- core: encode


def reference_encode(text: str, merges: Sequence[tuple[int, int]]) -> list[int]:
    """Encode ``text`` (one chunk, no pre-splitting) by applying the merges in rank order.

    Repeatedly find, among the adjacent pairs present, the one merged earliest in training
    (lowest rank) and replace all its occurrences, left to right, by its token.
    """
    ranks = {tuple(pair): 256 + i for i, pair in enumerate(merges)}
    ids = list(text.encode("utf-8"))
    while len(ids) >= 2:
        pair = min(pairwise(ids), key=lambda p: ranks.get(p, math.inf))
        if pair not in ranks:
            break
        new_id, out, i = ranks[pair], [], 0
        while i < len(ids):
            if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
                out.append(new_id)
                i += 2
            else:
                out.append(ids[i])
                i += 1
        ids = out
    return ids


def _apply_in_order(
    text: str, merges: Sequence[tuple[int, int]], order: Sequence[int]
) -> list[int]:
    """Apply merge i (making token 256 + i) once over the whole text, for i in ``order``."""
    ids = list(text.encode("utf-8"))
    for i in order:
        pair, out, j = tuple(merges[i]), [], 0
        while j < len(ids):
            if j + 1 < len(ids) and (ids[j], ids[j + 1]) == pair:
                out.append(256 + i)
                j += 2
            else:
                out.append(ids[j])
                j += 1
        ids = out
    return ids


def _encode_hint(got: Any, expected: Any, args: Any) -> str:
    text, merges = args
    if got == _apply_in_order(text, merges, range(len(merges) - 1, -1, -1)):
        return "apply the merges in the order they were learned: merge 0 first, then merge 1, ..."
    if got == list(text.encode("utf-8")):
        return "start from the UTF-8 bytes, then apply every merge whose pair occurs"
    return (
        "start from list(text.encode('utf-8')); then, while some adjacent pair is a merge, "
        "replace every occurrence of the earliest-learned such pair (left to right) by its id"
    )


@exercise("ch01.encode", difficulty="core", title="Encode text with learned merges")
def _check_encode(answer: Any) -> str:
    ab_bc = [(97, 98), (98, 99)]  # 256 = "ab", 257 = "bc": in "abc", "ab" wins (learned first)
    bc_ab = [(98, 99), (97, 98)]  # the same pairs learned the other way round
    aa = [(97, 97), (256, 97)]  # 256 = "aa", 257 = "aa" + "a"
    words = [(116, 104), (256, 101), (32, 257), (105, 110), (0xC3, 0xA9)]  # th, the, " the", in, é
    cases = [
        (("abc", ab_bc), [256, 99]),
        (("abc", bc_ab), [97, 256]),
        (("aaaa", aa), [256, 256]),  # left to right: (aa)(aa), and no (aa)+a is left
        (("aaa", aa), [257]),
        (("xyz", ab_bc), [120, 121, 122]),
        ((" the inn café", words), [258, 32, 259, 110, 32, 99, 97, 102, 260]),
    ]
    for text in unseen(lambda r: "".join(r.choice(("th", "e", " ", "in", "n", "é", "a", "x")) for _ in range(r.randint(1, 16)))):  # fmt: skip
        cases.append(((text, words), reference_encode(text, words)))
    return check_cases(answer, cases, exact=True, hint=_encode_hint)


# --------------------------------------------------------------------------- stretch


def reference_unigram_bits_per_byte(ids: Sequence[int], n_bytes: int) -> float:
    """Bits per byte of the best context-free model of ``ids``, fitted on ``ids`` themselves.

    A unigram model predicts every token with its frequency p(t) = count(t) / N, ignoring
    what came before. Its total code length is -sum over positions of log2 p(token), i.e.
    -sum_t count(t) * log2(count(t) / N) bits, spread over the ``n_bytes`` bytes of text.
    """
    counts = Counter(int(i) for i in ids)
    n = sum(counts.values())
    bits = -sum(c * math.log2(c / n) for c in counts.values())
    return bits / n_bytes


def _unigram_hint(got: Any, expected: Any, args: Any) -> str:
    ids, n_bytes = args
    n = len(ids)
    ratio = float(got) / expected if expected else math.nan
    if math.isclose(ratio, math.log(2), rel_tol=1e-6):
        return "that is in nats: use math.log2 (or divide by math.log(2)) to get bits"
    if math.isclose(ratio, n_bytes / n, rel_tol=1e-6):
        return "that is bits per token: divide the total bits by the number of bytes instead"
    uniform = math.log2(len(set(ids))) * n / n_bytes
    if math.isclose(float(got), uniform, rel_tol=1e-6):
        return (
            "that is a uniform model over the distinct tokens; weight each token by its "
            "frequency: p(t) = count(t) / N"
        )
    return "total bits = -sum over tokens t of count(t) * log2(count(t) / N); divide by n_bytes"


@exercise(
    "ch01.unigram_bits_per_byte",
    difficulty="stretch",
    title="Bits per byte of a unigram model",
)
def _check_unigram_bits_per_byte(answer: Any) -> str:
    tok = _tokenizer()
    story = "Pip had a red ball. Pip loved the red ball very much. The café was closed."
    inputs = [
        ([1, 1, 2, 2], 8),  # two equally likely tokens: 1 bit per token, 4 bits over 8 bytes
        ([5, 5, 5, 7], 4),
        ([42] * 10, 20),  # one token, always: no surprise at all
        ([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], 30),
        (tok.encode(story), len(story.encode("utf-8"))),
    ]
    inputs += unseen(
        lambda r: ([r.randrange(9) for _ in range(r.randint(1, 40))], r.randint(40, 200))
    )
    message = check_cases(
        answer,
        [(args, reference_unigram_bits_per_byte(*args)) for args in inputs],
        rel=1e-6,
        abs_tol=1e-12,
        hint=_unigram_hint,
    )
    # A list is not the only sequence of ids a learner meets: a tensor must work too.
    import torch

    ids = torch.tensor(inputs[3][0])
    got = call(answer, ids, inputs[3][1])
    try:
        value = float(got)
    except (TypeError, ValueError):
        raise Fail(
            f"with a torch tensor of ids your function returned {got!r}, not a number",
            hint="convert the ids to Python ints first, e.g. ids = [int(i) for i in ids]",
        ) from None
    expect_close(
        value,
        reference_unigram_bits_per_byte(*inputs[3]),
        rel=1e-6,
        what="your function on a torch tensor of the same ids",
        hint="convert the ids to Python ints first (tensor elements hash by identity): "
        "ids = [int(i) for i in ids]",
    )
    return message
