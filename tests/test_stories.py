"""Tests of the story grammar: exact probabilities, unambiguous text, determinism."""

from __future__ import annotations

import dataclasses
import math
import random
import re

import pytest

from tinylm.stories import (
    BOY,
    GIRL,
    KID,
    Kind,
    StoryGrammar,
    enumerate_stories,
    generate_stories,
    sample_story,
    story_log2prob,
)


@pytest.fixture(scope="module")
def sample() -> list[tuple[str, float]]:
    return generate_stories(60, seed=123)


def test_same_seed_same_stories_and_different_seeds_differ():
    assert generate_stories(5, seed=1) == generate_stories(5, seed=1)
    assert generate_stories(5, seed=1) != generate_stories(5, seed=2)
    # one generator in order: fewer stories are a prefix of more stories
    assert generate_stories(3, seed=1) == generate_stories(5, seed=1)[:3]


def test_the_global_random_state_is_neither_used_nor_changed():
    state = random.getstate()
    random.seed(999)
    a = generate_stories(3, seed=4)
    random.seed(0)
    assert generate_stories(3, seed=4) == a
    random.setstate(state)


def test_scorer_recovers_the_generators_log2prob(sample):
    for text, log2p in sample:
        assert log2p < 0
        assert story_log2prob(text) == pytest.approx(log2p, abs=1e-9)


def test_scorer_rejects_text_the_grammar_cannot_write(sample):
    text = sample[0][0]
    with pytest.raises(ValueError, match="cannot write this text"):
        story_log2prob(text + " And then a dragon came.")
    with pytest.raises(ValueError, match="near character 0"):
        story_log2prob("It was a dark and stormy night.")
    with pytest.raises(ValueError, match="one story at a time"):
        story_log2prob(text + "<|endoftext|>")
    with pytest.raises(ValueError):
        story_log2prob("")


def test_tiny_grammar_enumerates_to_the_stories_counted_by_hand():
    # keep=1 leaves two equally weighted hero names (Mia, Lily: weight 3 each), one friend
    # name (the other girl), and two equally weighted spots (weight 2 each): the toy is
    # looked for in one and found in the other. Every other choice has a single option.
    g = StoryGrammar().shrink(1)
    stories = list(enumerate_stories(g))
    assert len(stories) == 2 * 2
    assert [p for _, p in stories] == pytest.approx([0.25] * 4)
    assert len({text for text, _ in stories}) == 4


def test_small_grammar_enumerates_to_distinct_texts_with_total_probability_one():
    # every hero and friend kind (pronouns chosen for animals), all four plots, 1-2 looks
    g = StoryGrammar().shrink(1, heroes=8, friends=10, plots=4, spots=3)
    stories = list(enumerate_stories(g))
    texts = [text for text, _ in stories]
    assert len(set(texts)) == len(texts) > 1000  # unambiguous: no text is written twice
    assert math.fsum(p for _, p in stories) == pytest.approx(1.0, abs=1e-12)
    for text, p in stories[::97]:  # the parser agrees with the enumeration
        assert story_log2prob(text, g) == pytest.approx(math.log2(p), abs=1e-9)


def test_shrunken_grammar_still_writes_other_texts_than_the_full_one():
    small = StoryGrammar().shrink(1)
    text, _ = next(iter(enumerate_stories(small)))
    assert story_log2prob(text) < story_log2prob(text, small)  # the full grammar has more options


def test_ambiguous_grammar_is_detected():
    # Two owls that differ only in how they rescue a toy: outside the "stuck" plot their
    # stories read the same, so the text no longer tells which choice was made.
    owls = {Kind("owl", "animal_names"): 1, Kind("owl", "animal_names", rescue="flew up"): 1}
    g = dataclasses.replace(StoryGrammar().shrink(1), friends=owls)
    texts = [text for text, _ in enumerate_stories(g)]
    assert len(set(texts)) < len(texts)
    with pytest.raises(RuntimeError, match="ambiguous"):
        story_log2prob(texts[0], g)


def test_options_that_write_the_same_text_are_rejected():
    g = dataclasses.replace(
        StoryGrammar().shrink(1),
        things={"kite": 1},
        games={"fly the {thing}": 1, "fly the kite": 1},
    )
    with pytest.raises(ValueError, match="same text"):
        list(enumerate_stories(g))


def test_pronouns_agree_with_their_verbs(sample):
    for text, _ in sample:
        assert not re.search(r"\b[Tt]hey was\b", text)
        assert not re.search(r"\b([Ss]he|[Hh]e) were\b", text)
    g = dataclasses.replace(StoryGrammar(), heroes={KID: 1}, friends={GIRL: 1, BOY: 1})
    text, _ = sample_story(random.Random(0), g)
    assert "They lived" in text and " she " not in text.split("met")[0]


def test_ending_repeats_the_name_and_toy_chosen_at_the_start(sample):
    for text, _ in sample:
        name = re.search(r"named (\w+)\.", text).group(1)
        toy = re.search(r" (?:had|favorite toy was) an? ([\w -]+)\.", text).group(1)
        last_paragraph = text.split("\n\n")[-1]
        assert name in last_paragraph and toy in last_paragraph, text


def test_name_lists_are_disjoint():
    g = StoryGrammar()
    lists = [set(getattr(g, f)) for f in ("girl_names", "boy_names", "kid_names", "animal_names")]
    assert sum(map(len, lists)) == len(set().union(*lists))


def test_invalid_grammars_are_rejected_clearly():
    with pytest.raises(ValueError, match="unknown plots"):
        StoryGrammar(plots={"dragon": 1})
    with pytest.raises(ValueError, match="positive"):
        StoryGrammar(colors={"red": 1, "blue": 0})
    with pytest.raises(ValueError, match="at least 2"):
        StoryGrammar(spots={"under the bench": 1})
    with pytest.raises(ValueError, match="unknown StoryGrammar fields"):
        StoryGrammar().shrink(colours=2)
    with pytest.raises(ValueError, match="n_stories"):
        generate_stories(0)
