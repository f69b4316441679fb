"""A byte-level BPE tokenizer, trained from scratch (in the spirit of minbpe).

How it works, in four steps:

1. Bytes. Text is UTF-8 encoded, so every string is a sequence of byte values
   0..255. Those 256 bytes are the first 256 tokens: any text can be encoded,
   even characters never seen in training, and decoding is exact.
2. Pre-splitting. The text is first cut at special tokens (``<|endoftext|>``),
   then into chunks by a regular expression (roughly: words with their
   leading space, numbers, punctuation, runs of whitespace). Merges never
   cross a chunk boundary, so no token glues the end of one word to the next.
3. Training. Count every adjacent pair of tokens in all chunks, merge the
   most frequent pair into a new token, repeat until the vocabulary has the
   requested size. Merge ``i`` creates token ``256 + i``.
4. Encoding. Split the text the same way, then in each chunk apply the
   merges in the order they were learned (always the lowest-ranked pair
   present). Decoding concatenates the bytes of the tokens.

Two things make this fast enough for a megabyte of text in pure Python:

* Training works on *unique* chunks with their counts (natural text repeats
  words a lot), keeps an index pair -> chunks that contain it, and after a
  merge updates only the counts of the chunks that contained the merged pair.
  A heap finds the most frequent pair without rescanning all pairs.
* Encoding caches the ids of each chunk it has seen, so a common word is
  merged once and then looked up.

Ties between equally frequent pairs go to the lowest pair ``(a, b)`` so that
training is reproducible.

    >>> tok = BPETokenizer.train("aaabdaaabac", vocab_size=256 + 3 + 1)
    >>> tok.merges  # aa -> 256, ab -> 257, (aa)(ab) -> 258
    [(97, 97), (97, 98), (256, 257)]
    >>> tok.encode("aaabdaaabac<|endoftext|>")
    [258, 100, 258, 97, 99, 259]
"""

from __future__ import annotations

import heapq
import json
import os
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

from tinylm.util import atomic_write, is_int

EOT = "<|endoftext|>"
DEFAULT_SPECIAL_TOKENS: tuple[str, ...] = (EOT,)

# The file format: bump FORMAT_VERSION whenever the meaning of a field changes.
FORMAT_NAME = "tinylm-bpe"
FORMAT_VERSION = 1

# Pre-split patterns, by name. They are written for Python's built-in `re` so
# that the tokenizer has no dependency beyond the standard library. The GPT-2
# and GPT-4 originals use the `regex` package's Unicode classes \p{L}
# (letter) and \p{N} (number), which `re` lacks; we spell them with classes it
# has:
#   letter        \p{L}                 ->  [^\W\d_]      (a word character that
#                                                          is not a digit or "_")
#   number        \p{N}                 ->  \d            (decimal digits)
#   other         [^\s\p{L}\p{N}]       ->  (?:[^\s\w]|_)
# On ASCII and ordinary accented text the splits are identical to the
# originals (the tests check this when `regex` is installed). They differ only
# on rare characters: numerals such as "²" or "Ⅻ" count as letters here, and
# `re` treats the separators \x1c-\x1f as whitespace. GPT-4's possessive
# quantifiers (?+, ++) need Python 3.11 and do not change what this pattern
# matches (nothing after them can backtrack into them), so they are dropped.
# Every pattern must cover the whole text: each character lands in some chunk.
PATTERNS: dict[str, str] = {
    # The default: words keep one leading space and their punctuation
    # ("dog." is one chunk); other whitespace forms its own chunks.
    "whitespace": r" ?\S+|\s+(?!\S)|\s+",
    # GPT-2: contractions, letters, numbers and punctuation split apart.
    "gpt2": r"'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+",
    # GPT-4 (cl100k): case-insensitive contractions, numbers in groups of at
    # most three digits, newlines kept apart from other whitespace.
    "gpt4": (
        r"'(?i:[sdmt]|ll|ve|re)|(?:[^\r\n\w]|_)?[^\W\d_]+|\d{1,3}"
        r"| ?(?:[^\s\w]|_)+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
    ),
}
DEFAULT_PATTERN = "whitespace"

# Encoding cache size (chunks). A megabyte of English has some tens of
# thousands of distinct chunks; the cap only keeps memory bounded on huge,
# varied input (the cache is simply emptied when full).
_CACHE_MAX = 200_000


def resolve_pattern(pattern: str | None) -> str:
    """Return the regex for a pattern name ("whitespace", "gpt2", "gpt4"), or check a raw regex.

    ``None`` means the default, ``"whitespace"``.
    """
    if pattern is None:
        pattern = DEFAULT_PATTERN
    if not isinstance(pattern, str):
        raise TypeError(
            f"pattern must be a name {sorted(PATTERNS)}, a regex string or None, "
            f"not {type(pattern).__name__}"
        )
    regex = PATTERNS.get(pattern, pattern)
    try:
        compiled = re.compile(regex)
    except re.error as e:
        raise ValueError(
            f"pattern {pattern!r} is neither a known name {sorted(PATTERNS)} nor a valid "
            f"regular expression ({e}); fix: pass one of the names or a regex for Python's `re`"
        ) from None
    if compiled.groups:
        # findall would return the groups instead of the whole chunks.
        raise ValueError(
            f"pattern {pattern!r} has capturing groups; fix: write them as non-capturing (?:...)"
        )
    return regex


def _merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of ``pair`` in ``ids`` (left to right) by ``new_id``."""
    a, b = pair
    out: list[int] = []
    i, n = 0, len(ids)
    while i < n:
        if ids[i] == a and i + 1 < n and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _chunks(compiled: re.Pattern[str], text: str) -> list[str]:
    """Split ``text`` into pre-split chunks that, joined, give back ``text`` exactly."""
    chunks = compiled.findall(text)
    if sum(map(len, chunks)) == len(text):
        return chunks  # the matches tile the text (always true for PATTERNS)
    # A custom pattern skipped some characters: keep them as chunks of their
    # own so that nothing is lost (training and encoding both come here).
    out, pos = [], 0
    for m in compiled.finditer(text):
        if m.start() > pos:
            out.append(text[pos : m.start()])
        if m.group():
            out.append(m.group())
        pos = m.end()
    if pos < len(text):
        out.append(text[pos:])
    return out


def _learn_merges(chunk_counts: dict[str, int], n_merges: int) -> list[tuple[int, int]]:
    """Learn up to ``n_merges`` merges from unique chunks and their frequencies.

    The incremental algorithm: ``counts[pair]`` is the number of times ``pair``
    occurs in the whole text (each chunk weighted by its frequency) and
    ``where[pair]`` the chunks that may contain it. Merging a pair only
    changes the chunks in ``where[pair]``; for each of them we subtract the
    counts of its old pairs and add those of its new ones. The heap holds
    ``(-count, pair)``; entries whose count has changed since they were pushed
    are skipped when popped ("lazy deletion"), and each changed count gets a
    fresh entry. Among equal counts the heap pops the lowest pair first.
    """
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    freqs = list(chunk_counts.values())
    counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for w, (ids, freq) in enumerate(zip(words, freqs, strict=True)):
        for pair in pairwise(ids):
            counts[pair] += freq
            where[pair].add(w)
    # heapq is a min-heap, so store -count: the most frequent pair comes out first.
    heap = [(-count, pair) for pair, count in counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    while len(merges) < n_merges and heap:
        neg_count, pair = heapq.heappop(heap)
        if counts.get(pair) != -neg_count:
            continue  # stale entry: this pair's count changed after it was pushed
        new_id = 256 + len(merges)
        merges.append(pair)
        changed: set[tuple[int, int]] = set()
        for w in where.pop(pair):
            old = words[w]
            new = _merge(old, pair, new_id)
            if len(new) == len(old):
                continue  # stale index entry: an earlier merge already removed the pair
            freq = freqs[w]
            old_pairs = list(pairwise(old))
            new_pairs = list(pairwise(new))
            for p in old_pairs:
                counts[p] -= freq
            for p in new_pairs:
                counts[p] += freq
                where[p].add(w)
            changed.update(old_pairs)
            changed.update(new_pairs)
            words[w] = new
        for p in changed:
            count = counts[p]
            if count > 0:
                heapq.heappush(heap, (-count, p))
            else:  # the pair is gone everywhere (the merged pair itself, for one)
                del counts[p]
                where.pop(p, None)
    return merges


class BPETokenizer:
    """Byte-level BPE: 256 byte tokens, then one token per merge, then the special tokens.

    Build one with :meth:`train` or :meth:`load`. The constructor takes
    already-learned merges and checks that they are consistent.
    """

    def __init__(
        self,
        merges: Iterable[tuple[int, int]] = (),
        pattern: str | None = None,
        special_tokens: Iterable[str] = DEFAULT_SPECIAL_TOKENS,
    ) -> None:
        self.pattern: str = resolve_pattern(pattern)
        self._compiled = re.compile(self.pattern)
        self._merges: list[tuple[int, int]] = _check_merges(merges)
        specials = _check_special_tokens(special_tokens)

        # id -> bytes. A merged token's bytes are its two parts' bytes joined.
        self._vocab: list[bytes] = [bytes([i]) for i in range(256)]
        for a, b in self._merges:
            self._vocab.append(self._vocab[a] + self._vocab[b])
        # The rank of a merge is its new token's id, so "lowest rank" = "lowest id".
        self._ranks: dict[tuple[int, int], int] = {
            pair: 256 + i for i, pair in enumerate(self._merges)
        }
        self.special_tokens: dict[str, int] = {}
        for s in specials:
            self.special_tokens[s] = len(self._vocab)
            self._vocab.append(s.encode("utf-8"))
        # One capturing group, so re.split keeps the special tokens it cuts at.
        # Longest first, so that a special token that contains another wins.
        self._special_re = (
            re.compile(
                "(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")"
            )
            if specials
            else None
        )
        self._cache: dict[str, list[int]] = {}

    # ---------------------------------------------------------------- training

    @classmethod
    def train(
        cls,
        text: str,
        vocab_size: int,
        pattern: str | None = None,
        special_tokens: Iterable[str] = DEFAULT_SPECIAL_TOKENS,
    ) -> BPETokenizer:
        """Learn ``vocab_size - 256 - len(special_tokens)`` merges from ``text``.

        ``pattern`` is a name from :data:`PATTERNS` ("whitespace", the default,
        "gpt2" or "gpt4") or a regular expression for Python's ``re``.
        Special tokens in ``text`` are cut out first, so no merge spans one.
        If the text runs out of pairs before the vocabulary is full, training
        stops early with a warning and the tokenizer is smaller.
        """
        _check_text(text)
        specials = _check_special_tokens(special_tokens)
        if not is_int(vocab_size):
            raise TypeError(f"vocab_size must be an int, not {type(vocab_size).__name__}")
        n_merges = vocab_size - 256 - len(specials)
        if n_merges < 0:
            raise ValueError(
                f"vocab_size={vocab_size} is too small: the 256 byte tokens and "
                f"{len(specials)} special token(s) already need {256 + len(specials)}; "
                f"fix: ask for vocab_size >= {256 + len(specials)}"
            )
        regex = resolve_pattern(pattern)
        compiled = re.compile(regex)

        # Count each distinct chunk once: training cost then depends on the
        # number of distinct words, not on the length of the text.
        chunk_counts: Counter[str] = Counter()
        for part in _split_on_specials(text, specials):
            chunk_counts.update(_chunks(compiled, part))
        try:
            merges = _learn_merges(chunk_counts, n_merges)
        except UnicodeEncodeError:
            raise _surrogate_error(text) from None
        if len(merges) < n_merges:
            warnings.warn(
                f"the training text ran out of pairs to merge after {len(merges)} of "
                f"{n_merges} merges, so vocab_size is {256 + len(merges) + len(specials)} "
                f"instead of {vocab_size}; fix: train on more text or ask for a smaller "
                "vocab_size",
                stacklevel=2,
            )
        return cls(merges, pattern=regex, special_tokens=specials)

    # --------------------------------------------------------------- encoding

    def encode(self, text: str) -> list[int]:
        """Encode ``text`` to token ids; special-token strings in it map to their ids."""
        _check_text(text)
        if self._special_re is None:
            return self.encode_ordinary(text)
        ids: list[int] = []
        try:
            # re.split with one group alternates: text, special, text, special, ...
            for i, part in enumerate(self._special_re.split(text)):
                if i % 2:
                    ids.append(self.special_tokens[part])
                elif part:
                    ids.extend(self._encode_ordinary(part))
        except UnicodeEncodeError:
            raise _surrogate_error(text) from None
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode ``text`` as plain text: special-token strings are spelled out in bytes."""
        _check_text(text)
        try:
            return self._encode_ordinary(text)
        except UnicodeEncodeError:
            raise _surrogate_error(text) from None

    def _encode_ordinary(self, text: str) -> list[int]:
        """Encode chunk by chunk, looking each chunk up in the cache first."""
        ids: list[int] = []
        cache = self._cache
        for chunk in _chunks(self._compiled, text):
            chunk_ids = cache.get(chunk)
            if chunk_ids is None:
                chunk_ids = self._encode_chunk(chunk.encode("utf-8"))
                if len(cache) >= _CACHE_MAX:
                    cache.clear()
                cache[chunk] = chunk_ids
            ids.extend(chunk_ids)
        return ids

    def _encode_chunk(self, data: bytes) -> list[int]:
        """Apply the merges to one chunk, always the lowest-ranked pair present first."""
        ids = list(data)
        ranks = self._ranks
        while len(ids) >= 2:
            pair = min(pairwise(ids), key=lambda p: ranks.get(p, 1 << 62))
            new_id = ranks.get(pair)
            if new_id is None:
                break  # no pair in this chunk was ever merged: done
            ids = _merge(ids, pair, new_id)
        return ids

    def tokenize(self, text: str) -> list[str]:
        """Encode ``text`` and show each token as a string (for looking, not for decoding)."""
        return [self.id_to_piece(i) for i in self.encode(text)]

    # --------------------------------------------------------------- decoding

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Concatenate the bytes of the tokens ``ids`` (a list, or a torch/numpy array)."""
        if hasattr(ids, "tolist"):  # torch tensors and numpy arrays, without importing them
            ids = ids.tolist()
        ids = ids if isinstance(ids, list) else list(ids)
        if ids and (min(ids) < 0 or max(ids) >= len(self._vocab)):
            bad = next(i for i in ids if not 0 <= i < len(self._vocab))
            raise ValueError(
                f"token id {bad} is out of range for this tokenizer (0..{len(self._vocab) - 1}); "
                "fix: decode with the tokenizer the ids were encoded with"
            )
        return b"".join(map(self._vocab.__getitem__, ids))

    def decode(self, ids: Iterable[int]) -> str:
        """Decode token ids to text. Bytes that are not valid UTF-8 become U+FFFD.

        Ids from :meth:`encode` always decode to the original text; a model's
        sample may cut a multi-byte character in half, hence the replacement.
        """
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ------------------------------------------------------------ inspection

    @property
    def vocab_size(self) -> int:
        """Number of token ids: 256 bytes + merges + special tokens."""
        return len(self._vocab)

    def __len__(self) -> int:
        return len(self._vocab)

    @property
    def merges(self) -> list[tuple[int, int]]:
        """The learned merges in order; merge ``i`` makes token ``256 + i`` (a copy)."""
        return list(self._merges)

    @property
    def eot_id(self) -> int | None:
        """Id of the end-of-text token: the first special token, or None if there is none."""
        return next(iter(self.special_tokens.values()), None)

    @property
    def pattern_name(self) -> str | None:
        """The name of the pre-split pattern in :data:`PATTERNS`, or None for a custom regex."""
        return next((name for name, p in PATTERNS.items() if p == self.pattern), None)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes that token ``token_id`` stands for."""
        if not 0 <= token_id < len(self._vocab):
            raise ValueError(
                f"token id {token_id} is out of range (0..{len(self._vocab) - 1}); "
                "fix: pass an id below vocab_size"
            )
        return self._vocab[token_id]

    def id_to_piece(self, token_id: int) -> str:
        """Token ``token_id`` as a string to show a learner.

        A token can hold part of a multi-byte character (one byte of an emoji,
        say); those bytes are shown as U+FFFD, so the piece may not decode back.
        """
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        pattern = self.pattern_name or self.pattern
        return (
            f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self._merges)}, "
            f"pattern={pattern!r}, special_tokens={list(self.special_tokens)})"
        )

    # ------------------------------------------------------------ save / load

    def to_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild the tokenizer, as JSON-ready values."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "vocab_size": self.vocab_size,
            "pattern": self.pattern,
            "special_tokens": list(self.special_tokens),
            "merges": [list(pair) for pair in self._merges],
        }

    @classmethod
    def from_dict(cls, d: Any, source: str = "tokenizer dict") -> BPETokenizer:
        """Rebuild a tokenizer from :meth:`to_dict`; errors name ``source`` (e.g. a path)."""
        fix_retrain = "fix: train the tokenizer again and save it with BPETokenizer.save()"
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise ValueError(
                f'{source} is not a tinylm tokenizer (no "format": "{FORMAT_NAME}" field); '
                "fix: pass a file written by BPETokenizer.save()"
            )
        if d.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{source} has tokenizer format version {d.get('version')!r}, but this tinylm "
                f"reads version {FORMAT_VERSION}; {fix_retrain}"
            )
        missing = [k for k in ("pattern", "special_tokens", "merges") if k not in d]
        if missing:
            raise ValueError(f"{source} lacks the field(s) {missing}; {fix_retrain}")
        try:
            merges = [tuple(m) for m in d["merges"]] if isinstance(d["merges"], list) else None
            if merges is None or any(len(m) != 2 for m in merges):
                raise ValueError("merges must be a list of [a, b] pairs")
            if not isinstance(d["pattern"], str):
                raise ValueError(f"pattern must be a regex string, not {d['pattern']!r}")
            tok = cls(merges, pattern=d["pattern"], special_tokens=d["special_tokens"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source} is inconsistent: {e}; {fix_retrain}") from None
        if "vocab_size" in d and d["vocab_size"] != tok.vocab_size:
            raise ValueError(
                f"{source} is inconsistent: it says vocab_size={d['vocab_size']} but its merges "
                f"and special tokens make {tok.vocab_size}; {fix_retrain}"
            )
        return tok

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the tokenizer as JSON, atomically (a crash never leaves half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        d = self.to_dict()
        # One merge per line: small, diffable and readable (json's indent would
        # put every number on its own line).
        merges = "".join(f"\n    [{a}, {b}]," for a, b in self._merges).rstrip(",")
        head = json.dumps({k: v for k, v in d.items() if k != "merges"}, indent=2)[:-2]
        text = f'{head},\n  "merges": [{merges}\n  ]\n}}\n'
        return atomic_write(path, text)  # readers see the old file or the new one, never half

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BPETokenizer:
        """Read a tokenizer written by :meth:`save`, with a clear error if the file is bad."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"no tokenizer file at {path}; fix: check the path, or train one with "
                "BPETokenizer.train(...) and save it with .save(path)"
            )
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(
                f"{path} is not valid JSON ({e}): the file is truncated or corrupted, or not "
                "a tokenizer; fix: save the tokenizer again with BPETokenizer.save()"
            ) from None
        return cls.from_dict(d, source=str(path))


# ---------------------------------------------------------------- helpers


def _split_on_specials(text: str, specials: tuple[str, ...]) -> Iterator[str]:
    """Yield the parts of ``text`` between special tokens (the special tokens dropped)."""
    if not specials:
        yield text
        return
    splitter = re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True))))
    yield from (part for part in splitter.split(text) if part)


def _check_special_tokens(special_tokens: Iterable[str]) -> tuple[str, ...]:
    if isinstance(special_tokens, str):
        raise TypeError(
            f"special_tokens must be a sequence of strings, not one string; "
            f"fix: write ({special_tokens!r},)"
        )
    specials = tuple(special_tokens)
    for s in specials:
        if not isinstance(s, str) or not s:
            raise ValueError(f"special token {s!r} must be a non-empty string")
    if len(set(specials)) != len(specials):
        raise ValueError(f"special tokens {list(specials)} contain duplicates; list each once")
    return specials


def _check_merges(merges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Check that each merge joins two tokens that exist before it, and none repeats."""
    out: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    for i, merge in enumerate(merges):
        a, b = merge
        for x in (a, b):
            if not is_int(x) or not 0 <= x < 256 + i:
                raise ValueError(
                    f"merge {i} is {list(merge)}, but merge {i} can only join ids "
                    f"0..{256 + i - 1} (bytes and earlier merges)"
                )
        if (a, b) in seen:
            raise ValueError(f"merge {i} {[a, b]} repeats an earlier merge")
        seen.add((a, b))
        out.append((a, b))
    return out


def _check_text(text: object) -> None:
    if not isinstance(text, str):
        raise TypeError(
            f"text must be a str, not {type(text).__name__}; fix: decode bytes first "
            "(data.decode('utf-8'))"
        )


def _surrogate_error(text: str) -> ValueError:
    """The error for text that has no UTF-8 form (only a lone surrogate can cause that)."""
    m = re.search(r"[\ud800-\udfff]", text)
    where = f" {m.group()!r} at position {m.start()}" if m else ""
    return ValueError(
        f"the text has a lone surrogate{where}, which is not valid Unicode and has no "
        "UTF-8 bytes; fix: clean the text, e.g. text.encode('utf-8', 'replace').decode('utf-8')"
    )
