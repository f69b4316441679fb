"""Benchmark the BPE tokenizer: training time, encode/decode speed, compression.

Run by hand (not collected by pytest):

    .venv/bin/python tests/benchmarks/bench_tokenizer.py [--mb 1.0] [--vocab 1024] [--repeats 3]

Uses the workbook's "stories" corpus when ``tinylm.data`` provides it, else a
generated English-like text (Zipf-distributed made-up words in sentences).
Timings are medians of ``--repeats`` runs because a shared machine is noisy.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import warnings

from tinylm.tokenizer import EOT, PATTERNS, BPETokenizer


def english_like_text(n_bytes: int, seed: int = 0) -> str:
    """Deterministic English-like text: Zipfian words, sentences, paragraphs, documents."""
    rng = random.Random(seed)
    common = (
        "the a and to of was in he she it they said that his her with on for but "
        "had at one day little big very were there then so is you not all up out "
        "when what we can time once upon happy saw went played friend mom dad"
    ).split()
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ea", "ou")]
    made_up = sorted({"".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(6000)})
    vocab = common + made_up
    weights = [1.0 / (rank + 1) for rank in range(len(vocab))]  # Zipf's law
    rare = ["café", "naïve", "Zoë", "🙂", "über", "3", "42", "1999"]
    parts: list[str] = []
    size = 0
    while size < n_bytes:
        story = []
        for _ in range(rng.randint(3, 8)):  # paragraphs
            sentences = []
            for _ in range(rng.randint(2, 6)):
                words = rng.choices(vocab, weights, k=rng.randint(4, 14))
                if rng.random() < 0.05:
                    words[rng.randrange(len(words))] = rng.choice(rare)
                s = " ".join(words)
                s = s[0].upper() + s[1:] + rng.choice([".", ".", ".", "!", "?"])
                if rng.random() < 0.2:
                    s = f'"{s}" said {rng.choice(made_up[:50])}.'
                sentences.append(s)
            story.append(" ".join(sentences))
        doc = "\n\n".join(story) + EOT
        parts.append(doc)
        size += len(doc.encode("utf-8"))
    return "".join(parts)


def load_text(n_bytes: int) -> tuple[str, str]:
    """About ``n_bytes`` of text and where it came from (the best source available)."""
    try:
        from tinylm.data import load_corpus

        corpus = load_corpus("stories")
        text, source = corpus.text, "tinylm.data.load_corpus('stories')"
    except (ImportError, AttributeError, TypeError, ValueError):
        try:  # the generator behind the "stories" corpus, if tinylm.data is not there yet
            from tinylm.stories import generate_stories

            n = max(1, n_bytes // 700)
            text = "".join(story + EOT for story, _ in generate_stories(n))
            source = f"tinylm.stories.generate_stories({n})"
        except ImportError:
            return english_like_text(n_bytes), "generated English-like text"
    while len(text.encode("utf-8")) < n_bytes:  # repeat if the corpus is smaller
        text += text
    return text.encode("utf-8")[:n_bytes].decode("utf-8", errors="ignore"), source


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=1.0, help="megabytes of training text")
    parser.add_argument("--vocab", type=int, default=1024, help="vocabulary size")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per timing (median)")
    parser.add_argument(
        "--generated", action="store_true", help="use the generated Zipf text, not the stories"
    )
    args = parser.parse_args()

    if args.generated:
        text, source = english_like_text(int(args.mb * 1e6)), "generated English-like text"
    else:
        text, source = load_text(int(args.mb * 1e6))
    n_bytes = len(text.encode("utf-8"))
    print(f"text: {n_bytes / 1e6:.2f} MB from {source}; vocab_size {args.vocab}")
    print(
        f"{'pattern':<11} {'train s':>8} {'enc MB/s':>9} {'enc cold':>9} {'dec MB/s':>9} "
        f"{'bytes/tok':>9} {'vocab':>6}"
    )
    for pattern in PATTERNS:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tok = BPETokenizer.train(text, args.vocab, pattern=pattern)
            t_train = median_time(
                lambda p=pattern: BPETokenizer.train(text, args.vocab, pattern=p), args.repeats
            )
        # Cold: a fresh tokenizer (empty chunk cache); warm: the cache is filled.
        t_cold = median_time(
            lambda tok=tok: BPETokenizer.from_dict(tok.to_dict()).encode(text), args.repeats
        )
        ids = tok.encode(text)
        t_enc = median_time(lambda tok=tok: tok.encode(text), args.repeats)
        t_dec = median_time(lambda tok=tok, ids=ids: tok.decode(ids), args.repeats)
        assert tok.decode(ids) == text, "round trip failed"
        mb = n_bytes / 1e6
        print(
            f"{pattern:<11} {t_train:8.2f} {mb / t_enc:9.1f} {mb / t_cold:9.1f} "
            f"{mb / t_dec:9.1f} {n_bytes / len(ids):9.2f} {tok.vocab_size:6d}"
        )
        for w in caught:
            print("  warning:", w.message)
    print("enc cold includes building the tokenizer; decode includes UTF-8 decoding.")


if __name__ == "__main__":
    main()
