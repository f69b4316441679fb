"""Checks for notebook 01, "Text to tokens".

The inputs are chosen so that the typical mistakes give a different answer: counting
characters instead of UTF-8 bytes, decoding each token on its own (which breaks a character
whose bytes straddle two tokens), applying merges in the wrong order, and measuring a
loss in nats or per token instead of bits per byte.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from functools import cache
from itertools import pairwise
from typing import Any

from tinylm.course.exercises.core import Fail, call, check_cases, exercise, expect_close

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
    from tinylm.tokenizer import BPETokenizer

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
    cases = [((text, tok), reference_compression_ratio(text, tok)) for text in texts]
    return check_cases(answer, cases, rel=1e-9, hint=_compression_hint)


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
