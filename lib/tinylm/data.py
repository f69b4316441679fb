"""Corpora (generated stories, downloads, local files), train/val splits and batches.

    corpus = load_corpus("stories")             # generated offline; exact entropy known
    corpus = load_corpus("shakespeare")         # downloaded once, checksum-verified
    corpus = load_corpus("my_book.txt")         # any local UTF-8 text file
    data = prepare_tokens(corpus, tokenizer)    # TokenSplits: train/val token tensors
    x, y = get_batch(data.train, 16, 128, generator)

Losses are compared across tokenizers in *bits per byte*: the loss per token says little
when one tokenizer's tokens are twice as long as another's, the loss per byte of text does.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import re
import tempfile
import urllib.request
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol

import torch

from tinylm import stories
from tinylm.paths import cache_dir
from tinylm.stories import StoryGrammar, generate_stories, story_log2prob
from tinylm.util import atomic_write, sha256_file

__all__ = [
    "CORPORA",
    "DEFAULT_N_STORIES",
    "EOT",
    "Corpus",
    "RemoteText",
    "StoryGrammar",
    "TokenSplits",
    "bits_per_byte",
    "download",
    "get_batch",
    "load_corpus",
    "load_stories",
    "load_text_file",
    "prepare_tokens",
    "split_text",
    "stories_entropy_bits_per_byte",
    "story_log2prob",
    "text_documents",
]

EOT = "<|endoftext|>"  # written after every story; the tokenizer gives it a token of its own
# About 5 MB: a 90 s training run on a laptop CPU (1-3 M tokens of ~4 bytes) reads it only
# once or twice, so the validation loss measures generalisation, not memorisation.
DEFAULT_N_STORIES = 6_000


@dataclass(frozen=True, repr=False)
class Corpus:
    """A text corpus, where it came from, and (for generated text) its exact entropy."""

    name: str
    text: str
    entropy_bits_per_byte: float | None  # the best loss any model can reach; None: unknown
    source: str  # generator settings, URL or file path

    @cached_property
    def n_bytes(self) -> int:
        return len(self.text.encode("utf-8"))

    @cached_property
    def n_documents(self) -> int:
        return len(self.documents())

    def documents(self) -> list[str]:
        """The documents (stories) of the text, without their end-of-text markers."""
        docs = self.text.split(EOT)
        return docs[:-1] if len(docs) > 1 and docs[-1] == "" else docs

    def __repr__(self) -> str:  # the default repr would print megabytes of text
        entropy = (
            "unknown"
            if self.entropy_bits_per_byte is None
            else f"{self.entropy_bits_per_byte:.4f} bits/byte"
        )
        return (
            f"Corpus({self.name!r}: {self.n_bytes:,} bytes, {self.n_documents:,} documents, "
            f"entropy {entropy}, source {self.source!r})"
        )


# ----------------------------------------------------------------------------------------
# Generated stories (the default: offline, deterministic, exact entropy)


def load_stories(
    seed: int = 0,
    n_stories: int = DEFAULT_N_STORIES,
    grammar: StoryGrammar | None = None,
    cache: bool = True,
) -> Corpus:
    """Generate ``n_stories`` stories (see :mod:`tinylm.stories`), each followed by EOT.

    The default grammar's text is cached in ``cache_dir()``, keyed by the grammar's source
    code, the seed and the number of stories, with its entropy in a JSON file next to it.
    """
    grammar = grammar or stories.DEFAULT_GRAMMAR
    source = f"tinylm.stories (seed={seed}, n_stories={n_stories})"
    use_cache = cache and grammar == stories.DEFAULT_GRAMMAR
    if use_cache:
        stem = f"stories-{_grammar_fingerprint()}-seed{seed}-n{n_stories}"
        text_path, meta_path = cache_dir() / f"{stem}.txt", cache_dir() / f"{stem}.json"
        cached = _read_cached_text(text_path, meta_path)
        if cached is not None:
            text, meta = cached
            return Corpus("stories", text, meta["entropy_bits_per_byte"], source)

    generated = generate_stories(n_stories, seed, grammar)
    text = "".join(story + EOT for story, _ in generated)
    data = text.encode("utf-8")
    total_bits = -math.fsum(log2p for _, log2p in generated)  # -log2 p(corpus), exactly
    entropy = total_bits / len(data)
    if use_cache:
        meta = {
            "seed": seed,
            "n_stories": n_stories,
            "n_bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "total_bits": total_bits,
            "entropy_bits_per_byte": entropy,
        }
        atomic_write(text_path, data)
        atomic_write(meta_path, json.dumps(meta, indent=1).encode())  # last: marks complete
    return Corpus("stories", text, entropy, source)


def text_documents(text: str) -> list[str]:
    """The documents of a text written as ``doc + EOT + doc + EOT ...`` (empty ones dropped)."""
    return [doc for doc in text.split(EOT) if doc.strip()]


def stories_entropy_bits_per_byte(texts: list[str], grammar: StoryGrammar | None = None) -> float:
    """The exact entropy floor of these stories: -log2 p(stories) / their bytes.

    Each story counts with the EOT marker written after it, as in the corpus (the marker's
    bytes cost 0 bits: where a story ends is part of the grammar's choices). This is the
    floor of exactly the text a model is evaluated on, e.g. the validation stories or fresh
    stories from an unseen seed, rather than the whole corpus's average.
    """
    if not texts:
        raise ValueError("no stories given; pass a non-empty list of story texts (without EOT)")
    bits = -math.fsum(story_log2prob(text, grammar) for text in texts)
    n_bytes = sum(len((text + EOT).encode("utf-8")) for text in texts)
    return bits / n_bytes


def _grammar_fingerprint() -> str:
    """A short hash of the story generator's code: editing it invalidates the cache."""
    return hashlib.sha256(Path(stories.__file__).read_bytes()).hexdigest()[:12]


def _read_cached_text(text_path: Path, meta_path: Path) -> tuple[str, dict] | None:
    """The cached text and its metadata, or None if missing or damaged (then regenerate)."""
    try:
        meta = json.loads(meta_path.read_text())
        data = text_path.read_bytes()
    except (OSError, ValueError):
        return None
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        return None
    return data.decode("utf-8"), meta


# ----------------------------------------------------------------------------------------
# Downloads and local files


@dataclass(frozen=True)
class RemoteText:
    """A text file that can be downloaded, pinned by its SHA-256 checksum."""

    url: str
    sha256: str
    size: int  # bytes
    filename: str  # name in cache_dir()
    description: str = ""


CORPORA: dict[str, RemoteText] = {
    "shakespeare": RemoteText(
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        size=1_115_394,
        filename="tinyshakespeare.txt",
        description="tiny Shakespeare (Karpathy's char-rnn): 40,000 lines of the plays",
    ),
}


def download(url: str, sha256: str, dest: str | os.PathLike, timeout: float = 30.0) -> Path:
    """Download ``url`` to ``dest`` if its SHA-256 is ``sha256``; return ``dest``.

    The file is written to a temporary name and renamed only once the checksum matches,
    so ``dest`` is either absent or complete and correct. Raises ConnectionError when the
    server cannot be reached and ValueError when the checksum does not match.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    digest = hashlib.sha256()
    try:
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as r:
                while chunk := r.read(1 << 16):
                    out.write(chunk)
                    digest.update(chunk)
        except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets
            raise ConnectionError(
                f"could not download {url} ({getattr(e, 'reason', e)}). If this machine is "
                f"offline, download the file elsewhere and copy it to {dest}, or pass the "
                f"path of any local UTF-8 text file to load_corpus() (load_corpus('stories') "
                f"needs no network at all)."
            ) from e
        actual = digest.hexdigest()
        if actual != sha256:
            raise ValueError(
                f"the file downloaded from {url} does not match its checksum: expected "
                f"SHA-256 {sha256}, got {actual} ({Path(tmp).stat().st_size:,} bytes). "
                f"It was deleted; check the URL, or try again if the download was cut short."
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)  # a failed or mismatched download leaves nothing
    return dest


def _load_remote(name: str, timeout: float = 30.0) -> Corpus:
    """A corpus from CORPORA: verify the cached copy, or download it."""
    remote = CORPORA[name]
    path = cache_dir() / remote.filename
    if path.exists() and (actual := sha256_file(path)) != remote.sha256:
        path.unlink()
        warnings.warn(
            f"{path} did not match its checksum (expected SHA-256 {remote.sha256}, got "
            f"{actual}); deleted it and downloading a fresh copy",
            stacklevel=3,
        )
    if not path.exists():
        download(remote.url, remote.sha256, path, timeout=timeout)
    corpus = load_text_file(path)
    return Corpus(name, corpus.text, None, remote.url)


def load_text_file(path: str | os.PathLike) -> Corpus:
    """Read a local UTF-8 text file as a corpus (entropy unknown)."""
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise FileNotFoundError(
            f"corpus file {path} {what}. Pass the path of a UTF-8 text file, or one of "
            f"the corpus names {_known_names()}."
        )
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}). "
            f"Convert it first, e.g. `iconv -f latin1 -t utf-8 old.txt > new.txt`."
        ) from None
    if not text.strip():
        raise ValueError(f"{path} is empty (or only whitespace); a corpus needs some text")
    return Corpus(path.stem, text, None, str(path))


def _known_names() -> list[str]:
    return ["stories", *CORPORA]


def load_corpus(name_or_path: str | os.PathLike = "stories", seed: int = 0, **kw) -> Corpus:
    """Load a corpus by name ("stories", "shakespeare") or from a local text file.

    ``seed`` and ``**kw`` (``n_stories``, ``grammar``, ``cache``) go to :func:`load_stories`;
    downloads accept ``timeout``. Real text has ``entropy_bits_per_byte = None``.
    """
    name = name_or_path if isinstance(name_or_path, str) else None
    if name == "stories":
        return load_stories(seed=seed, **kw)
    if name in CORPORA:
        return _load_remote(name, **kw)
    if kw:
        raise TypeError(f"load_corpus() of a local file takes no options, got {sorted(kw)}")
    looks_like_path = name is None or any(c in name for c in "/\\.~") or Path(name).exists()
    if not looks_like_path:
        raise ValueError(
            f"unknown corpus {name!r}: the known names are {_known_names()}, or pass the "
            f"path of a local UTF-8 text file"
        )
    return load_text_file(name_or_path)


# ----------------------------------------------------------------------------------------
# Train/validation split, batches, bits per byte


class SupportsEncode(Protocol):
    """Anything with ``encode(text) -> list[int]``, e.g. tinylm.tokenizer.BPETokenizer."""

    def encode(self, text: str) -> list[int]: ...


@dataclass(repr=False)
class TokenSplits:
    """Token ids of the training and validation text, and how many bytes each encodes."""

    train: torch.Tensor  # int64, shape [N]
    val: torch.Tensor  # int64, shape [M]
    train_bytes: int
    val_bytes: int

    @property
    def train_bytes_per_token(self) -> float:
        return self.train_bytes / len(self.train)

    @property
    def val_bytes_per_token(self) -> float:
        return self.val_bytes / len(self.val)

    def __repr__(self) -> str:
        return (
            f"TokenSplits(train={len(self.train):,} tokens / {self.train_bytes:,} bytes, "
            f"val={len(self.val):,} tokens / {self.val_bytes:,} bytes, "
            f"{self.val_bytes_per_token:.2f} bytes per val token)"
        )


def _nearest(text: str, separator: str, target: int) -> int | None:
    """The cut (just after a separator) closest to ``target`` leaving text on both sides."""
    cuts = [m.end() for m in re.finditer(re.escape(separator), text)]
    cuts = [c for c in cuts if 0 < c < len(text)]
    return min(cuts, key=lambda c: abs(c - target)) if cuts else None


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """Split text into (train, val) with about ``val_fraction`` of it in val.

    The cut is at the document boundary (just after an EOT) nearest to that point, so no
    story is split between the two; text without EOT is cut at the nearest line break.
    Train the tokenizer on the train part only, so that val stays unseen.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if len(text) < 2:
        raise ValueError(f"cannot split a text of {len(text)} characters into train and val")
    target = round(len(text) * (1 - val_fraction))
    cut = _nearest(text, EOT, target) or _nearest(text, "\n", target)
    if cut is None:
        cut = min(max(target, 1), len(text) - 1)
    return text[:cut], text[cut:]


def prepare_tokens(
    corpus_or_text: Corpus | str, tokenizer: SupportsEncode, val_fraction: float = 0.1
) -> TokenSplits:
    """Split the text (:func:`split_text`) and encode each side with ``tokenizer.encode``."""
    text = corpus_or_text.text if isinstance(corpus_or_text, Corpus) else corpus_or_text
    if not isinstance(text, str):
        raise TypeError(f"prepare_tokens() needs a Corpus or a str, got {type(text).__name__}")
    train_text, val_text = split_text(text, val_fraction)
    train = torch.tensor(tokenizer.encode(train_text), dtype=torch.long)
    val = torch.tensor(tokenizer.encode(val_text), dtype=torch.long)
    if len(train) == 0 or len(val) == 0:
        raise ValueError("the tokenizer encoded the train or val text to no tokens at all")
    return TokenSplits(train, val, len(train_text.encode("utf-8")), len(val_text.encode("utf-8")))


def get_batch(
    tokens: torch.Tensor,
    batch_size: int,
    block_size: int,
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``batch_size`` random windows: inputs x and targets y (x shifted by one).

    Both are int64 of shape [batch_size, block_size]; ``y[b, t]`` is the token that
    follows ``x[b, t]``. The start positions come from ``generator``, so a seeded
    generator gives the same batches every run.
    """
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be a 1-D tensor, got shape {tuple(tokens.shape)}")
    if batch_size < 1 or block_size < 1:
        raise ValueError(f"batch_size and block_size must be >= 1, not {batch_size}, {block_size}")
    n = len(tokens)
    if n < block_size + 1:
        raise ValueError(
            f"a window needs block_size + 1 = {block_size + 1} tokens but the data has only "
            f"{n}; use a smaller block_size or more text (e.g. a larger val_fraction for val)"
        )
    starts = torch.randint(n - block_size, (batch_size,), generator=generator)
    # One gather instead of a Python loop: row b is tokens[starts[b] : starts[b] + block_size + 1].
    windows = tokens[starts[:, None] + torch.arange(block_size + 1)].long()
    x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
    if device is not None:
        x, y = x.to(device), y.to(device)
    return x, y


def bits_per_byte(mean_loss_nats_per_token: float, bytes_per_token: float) -> float:
    """Convert a cross-entropy loss in nats per token to bits per byte of text.

    nats -> bits: divide by ln 2; per token -> per byte: divide by bytes per token.
    """
    if not bytes_per_token > 0:
        raise ValueError(f"bytes_per_token must be positive, got {bytes_per_token}")
    return float(mean_loss_nats_per_token) / math.log(2) / bytes_per_token
