"""Tests of tinylm.data: corpora (generated, downloaded, local), splits, batches, bits/byte.

Downloads are tested against a local http.server on 127.0.0.1; nothing here touches the
real network or the repository's data/ folder (TINYLM_DATA_DIR points at tmp_path).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import math
import socket
import threading
from pathlib import Path

import pytest
import torch

from tinylm import data
from tinylm.data import (
    CORPORA,
    DEFAULT_N_STORIES,
    EOT,
    Corpus,
    RemoteText,
    StoryGrammar,
    bits_per_byte,
    download,
    get_batch,
    load_corpus,
    prepare_tokens,
    split_text,
    stories_entropy_bits_per_byte,
    story_log2prob,
    text_documents,
)
from tinylm.stories import generate_stories


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TINYLM_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


class ByteTokenizer:
    """Stand-in for the BPE tokenizer: one token per UTF-8 byte."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


# ----------------------------------------------------------------------------------------
# Generated stories


def test_stories_corpus_is_the_stories_each_followed_by_eot():
    corpus = load_corpus("stories", seed=3, n_stories=20)
    stories = [text for text, _ in generate_stories(20, seed=3)]
    assert corpus.text == "".join(s + EOT for s in stories)
    assert corpus.documents() == stories
    assert corpus.n_documents == 20 and corpus.name == "stories"
    assert corpus.n_bytes == len(corpus.text.encode("utf-8"))
    assert "20 documents" in repr(corpus) and len(repr(corpus)) < 300


def test_entropy_is_the_total_information_divided_by_bytes():
    corpus = load_corpus("stories", seed=5, n_stories=30)
    # score each story independently with the parser (EOT is certain: 0 bits)
    bits = -math.fsum(story_log2prob(doc) for doc in corpus.documents())
    assert corpus.entropy_bits_per_byte == pytest.approx(bits / len(corpus.text.encode()))
    assert 0 < corpus.entropy_bits_per_byte < 1


def test_stories_are_deterministic_for_a_seed():
    a = load_corpus("stories", seed=1, n_stories=10, cache=False)
    assert a.text == load_corpus("stories", seed=1, n_stories=10, cache=False).text
    assert a.text != load_corpus("stories", seed=2, n_stories=10, cache=False).text


def test_default_size_is_a_few_megabytes():
    sample = load_corpus("stories", seed=0, n_stories=200, cache=False)
    estimate = sample.n_bytes / 200 * DEFAULT_N_STORIES
    assert 4e6 < estimate < 6e6


def test_generated_text_is_cached_and_reused(data_dir, monkeypatch):
    first = load_corpus("stories", seed=7, n_stories=15)
    files = sorted(p.name for p in (data_dir / "cache").iterdir())
    assert [Path(f).suffix for f in files] == [".json", ".txt"]  # no temporary files left

    def no_generation(*args, **kw):
        raise AssertionError("should have used the cache")

    monkeypatch.setattr(data, "generate_stories", no_generation)
    again = load_corpus("stories", seed=7, n_stories=15)
    assert again.text == first.text
    assert again.entropy_bits_per_byte == first.entropy_bits_per_byte


def test_damaged_cache_is_regenerated(data_dir):
    first = load_corpus("stories", seed=8, n_stories=10)
    (text_file,) = (data_dir / "cache").glob("*.txt")
    text_file.write_text(first.text[:100])  # e.g. a copy cut short
    again = load_corpus("stories", seed=8, n_stories=10)
    assert again.text == first.text
    assert text_file.read_text() == first.text


def test_a_custom_grammar_is_not_cached(data_dir):
    corpus = load_corpus("stories", n_stories=3, grammar=StoryGrammar().shrink(1))
    assert corpus.n_documents == 3
    assert not list((data_dir / "cache").glob("*"))


# ----------------------------------------------------------------------------------------
# Downloads (local http.server) and local files


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@pytest.fixture
def server(tmp_path):
    """Serve tmp_path/www on 127.0.0.1 and yield (base_url, folder)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(www))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", www
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def unreachable_url() -> str:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/corpus.txt"


TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_download_writes_the_verified_file(server, tmp_path):
    url, www = server
    (www / "corpus.txt").write_text(TEXT)
    dest = tmp_path / "out" / "corpus.txt"
    assert download(f"{url}/corpus.txt", _sha(TEXT), dest, timeout=5) == dest
    assert dest.read_text() == TEXT
    assert [p.name for p in dest.parent.iterdir()] == ["corpus.txt"]


def test_download_with_wrong_checksum_fails_clearly_and_leaves_nothing(server, tmp_path):
    url, www = server
    (www / "corpus.txt").write_text(TEXT)
    dest = tmp_path / "out" / "corpus.txt"
    with pytest.raises(ValueError) as e:
        download(f"{url}/corpus.txt", "0" * 64, dest, timeout=5)
    assert "0" * 64 in str(e.value) and _sha(TEXT) in str(e.value)
    assert list(dest.parent.iterdir()) == []


def test_download_from_unreachable_server_says_what_to_do(unreachable_url, tmp_path):
    dest = tmp_path / "out" / "corpus.txt"
    with pytest.raises(ConnectionError) as e:
        download(unreachable_url, "0" * 64, dest, timeout=5)
    assert unreachable_url in str(e.value) and str(dest) in str(e.value)
    assert "local" in str(e.value)
    assert list(dest.parent.iterdir()) == []


def test_download_of_missing_file_fails_clearly(server, tmp_path):
    url, _ = server
    with pytest.raises(ConnectionError, match="not found|Not Found"):
        download(f"{url}/nope.txt", "0" * 64, tmp_path / "x.txt", timeout=5)


def test_registered_corpus_is_downloaded_once_then_read_from_cache(
    server, unreachable_url, data_dir, monkeypatch
):
    url, www = server
    (www / "corpus.txt").write_text(TEXT)
    entry = RemoteText(f"{url}/corpus.txt", _sha(TEXT), len(TEXT), "test-corpus.txt")
    monkeypatch.setitem(CORPORA, "shakespeare", entry)
    corpus = load_corpus("shakespeare", timeout=5)
    assert corpus.text == TEXT and corpus.entropy_bits_per_byte is None
    assert (data_dir / "cache" / "test-corpus.txt").read_text() == TEXT
    # offline now: the verified cached copy is enough
    monkeypatch.setitem(CORPORA, "shakespeare", dataclasses.replace(entry, url=unreachable_url))
    assert load_corpus("shakespeare", timeout=5).text == TEXT


def test_bad_cached_copy_is_deleted_and_fetched_again(server, data_dir, monkeypatch):
    url, www = server
    (www / "corpus.txt").write_text(TEXT)
    monkeypatch.setitem(
        CORPORA, "shakespeare", RemoteText(f"{url}/corpus.txt", _sha(TEXT), len(TEXT), "c.txt")
    )
    cached = data_dir / "cache" / "c.txt"
    cached.parent.mkdir(parents=True)
    cached.write_text("not the right text")
    with pytest.warns(UserWarning, match="checksum"):
        assert load_corpus("shakespeare", timeout=5).text == TEXT
    assert cached.read_text() == TEXT


def test_registered_corpus_offline_without_cache_names_the_url(unreachable_url, monkeypatch):
    monkeypatch.setitem(CORPORA, "shakespeare", RemoteText(unreachable_url, "0" * 64, 1, "c.txt"))
    with pytest.raises(ConnectionError, match=unreachable_url):
        load_corpus("shakespeare", timeout=5)


def test_registry_entries_are_pinned():
    for remote in CORPORA.values():
        assert remote.url.startswith("https://")
        assert len(remote.sha256) == 64 and int(remote.sha256, 16) >= 0
        assert remote.size > 0


def test_local_text_file(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("Héllo, wörld.\n", encoding="utf-8")
    corpus = load_corpus(path)
    assert corpus == Corpus("book", "Héllo, wörld.\n", None, str(path))
    assert load_corpus(str(path)).text == corpus.text


def test_local_file_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_corpus(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="not a file"):
        load_corpus(tmp_path)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        load_corpus(latin1)
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    with pytest.raises(ValueError, match="empty"):
        load_corpus(empty)
    with pytest.raises(TypeError, match="n_stories"):
        load_corpus(empty, n_stories=3)


def test_unknown_corpus_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="shakespeare") as e:
        load_corpus("shakespear")
    assert "stories" in str(e.value)


# ----------------------------------------------------------------------------------------
# Splits, token preparation, batches, bits per byte


def test_split_is_at_a_document_boundary_near_the_fraction():
    docs = [f"story number {i:03d}." for i in range(100)]  # all the same length
    text = "".join(d + EOT for d in docs)
    train, val = split_text(text, val_fraction=0.1)
    assert train + val == text
    assert train.endswith(EOT) and val.endswith(EOT)
    assert val == "".join(d + EOT for d in docs[90:])


def test_split_without_documents_cuts_at_a_line_break():
    text = "".join(f"line {i}\n" for i in range(50))
    train, val = split_text(text, val_fraction=0.2)
    assert train + val == text and train.endswith("\n")
    assert abs(len(val) / len(text) - 0.2) < 0.05
    train, val = split_text("abcdefghij", val_fraction=0.3)  # no boundary at all
    assert (train, val) == ("abcdefg", "hij")


def test_split_rejects_bad_arguments():
    with pytest.raises(ValueError, match="val_fraction"):
        split_text("some text", val_fraction=1.0)
    with pytest.raises(ValueError, match="split"):
        split_text("a")


def test_prepare_tokens_counts_the_bytes_of_each_side():
    text = "".join(f"Ünïcode story {i}.{EOT}" for i in range(40))
    splits = prepare_tokens(text, ByteTokenizer(), val_fraction=0.25)
    train, val = split_text(text, 0.25)
    assert splits.train.dtype == torch.long and splits.train.dim() == 1
    assert splits.train.tolist() == list(train.encode()) and splits.val.tolist() == list(
        val.encode()
    )
    assert splits.train_bytes + splits.val_bytes == len(text.encode())
    assert splits.train_bytes_per_token == splits.val_bytes_per_token == 1.0
    corpus = Corpus("t", text, None, "test")
    assert torch.equal(prepare_tokens(corpus, ByteTokenizer(), 0.25).val, splits.val)


def test_bytes_per_token_follows_the_tokenizer():
    class PairTokenizer:  # one token per two characters (ASCII): 2 bytes per token
        def encode(self, text: str) -> list[int]:
            return [ord(text[i]) for i in range(0, len(text), 2)]

    splits = prepare_tokens("ab\n" * 100 + "cd\n" * 100, PairTokenizer(), 0.5)
    assert splits.val_bytes_per_token == pytest.approx(splits.val_bytes / len(splits.val))
    assert 1.4 < splits.val_bytes_per_token <= 2.0


def test_get_batch_targets_are_inputs_shifted_by_one():
    tokens = torch.arange(100)
    x, y = get_batch(
        tokens, batch_size=8, block_size=16, generator=torch.Generator().manual_seed(0)
    )
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.long
    assert torch.equal(y, x + 1)
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)  # each row is a contiguous window
    assert x.min() >= 0 and y.max() <= 99


def test_get_batch_is_deterministic_for_a_generator_seed():
    tokens = torch.randint(1000, (500,), generator=torch.Generator().manual_seed(1))
    a = get_batch(tokens, 4, 8, torch.Generator().manual_seed(42))
    b = get_batch(tokens, 4, 8, torch.Generator().manual_seed(42))
    c = get_batch(tokens, 4, 8, torch.Generator().manual_seed(43))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_get_batch_uses_every_start_position_and_handles_dtypes_and_device():
    tokens = torch.arange(6, dtype=torch.int32)  # block 4: starts 0 and 1 are possible
    x, y = get_batch(tokens, 64, 4, torch.Generator().manual_seed(0), device="cpu")
    assert set(x[:, 0].tolist()) == {0, 1}
    assert x.dtype == torch.long and x.device.type == "cpu"


def test_get_batch_on_too_little_data_says_what_to_do():
    with pytest.raises(ValueError, match="block_size"):
        get_batch(torch.arange(10), 2, 10, torch.Generator())
    get_batch(torch.arange(11), 2, 10, torch.Generator())  # exactly enough


def test_bits_per_byte():
    assert bits_per_byte(math.log(2), 1.0) == pytest.approx(1.0)
    assert bits_per_byte(3 * math.log(2), 1.5) == pytest.approx(2.0)
    # a model that guesses uniformly among 256 byte values: 8 bits per byte
    assert bits_per_byte(math.log(256), 1.0) == pytest.approx(8.0)
    with pytest.raises(ValueError, match="bytes_per_token"):
        bits_per_byte(1.0, 0.0)


def test_floor_of_given_stories_is_their_exact_entropy():
    generated = generate_stories(20, seed=123)
    texts = [text for text, _ in generated]
    bits = -sum(log2p for _, log2p in generated)
    n_bytes = sum(len((text + EOT).encode()) for text in texts)
    assert stories_entropy_bits_per_byte(texts) == pytest.approx(bits / n_bytes, rel=1e-12)
    # a corpus made of exactly these stories has the same floor
    corpus = data.load_stories(seed=123, n_stories=20, cache=False)
    assert corpus.entropy_bits_per_byte == pytest.approx(
        stories_entropy_bits_per_byte(text_documents(corpus.text)), rel=1e-12
    )
    with pytest.raises(ValueError, match="no stories given"):
        stories_entropy_bits_per_byte([])


def test_text_documents_splits_at_eot_and_drops_empty_ones():
    assert text_documents(f"a b{EOT}c{EOT}\n{EOT}") == ["a b", "c"]
