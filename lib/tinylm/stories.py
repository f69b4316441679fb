"""Children's stories from a probabilistic grammar whose every probability is known.

The grammar is a small Python program, :meth:`StoryGrammar.tell`, that writes one story
while making its random choices through a *chooser*:

    ch.say(text)          write fixed text
    ch.say_one(options)   choose one phrase from a {phrase: weight} dict and write it
    ch.pick(options)      make a hidden choice (e.g. an animal's pronoun) without writing

Running the same program with different choosers gives three tools for the price of one:

* sample (roll the dice): a story and its exact log2-probability;
* parse (follow a given text): the choices that wrote it, hence ``log2 p(story)``;
* enumerate (try every option): every story of a small grammar, with its probability.

Because the probability of every story is known, so is the entropy of the corpus: the
lowest loss, in bits per byte, that *any* language model can reach on average on new
stories from the same grammar. The grammar is
unambiguous (two different sequences of choices never write the same text), which is what
makes ``-log2 p(story)`` the information content of the text; the parser checks this on
every story it reads.

Inside the program, sentences are templates such as ``"{name} hugged {his} {color} {thing}."``
whose placeholders hold the choices made earlier (with pronouns that agree: she/her/was,
he/him/his/was, they/them/their/were). So the stories need memory: the hero's name,
pronoun, toy and its colour are chosen in the first lines and must be repeated, correctly,
in the last ones, tens of tokens later.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

# ----------------------------------------------------------------------------------------
# Choosers: the three ways of running a story program


class Chooser(Protocol):
    """What a story program may do: write text and make weighted choices."""

    def say(self, text: str) -> None: ...
    def say_one(self, options: Mapping[str, float]) -> str: ...
    def pick(self, options: Mapping[T, float]) -> T: ...


class _Sampler:
    """Makes each choice at random with ``rng`` and adds up its log2-probability."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.parts: list[str] = []
        self.log2p = 0.0

    def pick(self, options: Mapping[T, float]) -> T:
        keys, weights = list(options), list(options.values())
        i = self.rng.choices(range(len(keys)), weights)[0]
        self.log2p += math.log2(weights[i] / sum(weights))
        return keys[i]

    def say(self, text: str) -> None:
        self.parts.append(text)

    def say_one(self, options: Mapping[str, float]) -> str:
        phrase = self.pick(options)
        self.say(phrase)
        return phrase


class _DeadEnd(Exception):
    """This run of the story program cannot write the target text."""


class _Search:
    """One run of a depth-first search over choice sequences (parsing or enumerating).

    The first ``len(forced)`` choices replay the option indices in ``forced``. At every
    later choice the run takes the first possible option and pushes the others onto
    ``queue`` as new forced prefixes, so each choice sequence is visited exactly once.
    With a ``target`` text, a run stops (``_DeadEnd``) as soon as it writes something the
    target does not continue with, and ``say_one`` only considers phrases that match:
    that keeps parsing a story to about one run instead of millions.
    """

    def __init__(self, target: str | None, forced: list[int], queue: list[list[int]]):
        self.target, self.forced, self.queue = target, forced, queue
        self.path: list[int] = []  # option index taken at each choice so far
        self.parts: list[str] = []
        self.pos = 0  # characters written so far
        self.log2p = 0.0

    def pick(self, options: Mapping[T, float], written: bool = False) -> T:
        keys, weights = list(options), list(options.values())
        depth = len(self.path)
        if depth < len(self.forced):
            i = self.forced[depth]
        else:
            candidates = list(range(len(keys)))
            if written and self.target is not None:  # skip phrases the text lacks
                candidates = [j for j in candidates if self.target.startswith(keys[j], self.pos)]
            if not candidates:
                raise _DeadEnd
            i = candidates[0]
            self.queue.extend(self.path + [j] for j in candidates[1:])
        self.path.append(i)
        self.log2p += math.log2(weights[i] / sum(weights))
        return keys[i]

    def say(self, text: str) -> None:
        if self.target is not None and not self.target.startswith(text, self.pos):
            raise _DeadEnd
        self.parts.append(text)
        self.pos += len(text)

    def say_one(self, options: Mapping[str, float]) -> str:
        phrase = self.pick(options, written=True)
        self.say(phrase)
        return phrase


# ----------------------------------------------------------------------------------------
# Characters


@dataclass(frozen=True)
class Pronoun:
    """The words that must agree with a character (he/him/his/was, they/them/their/were)."""

    he: str
    him: str
    his: str
    was: str  # the past tense of "to be" agrees too: she was, they were


SHE = Pronoun("she", "her", "her", "was")
HE = Pronoun("he", "him", "his", "was")
THEY = Pronoun("they", "them", "their", "were")

_POKE = "found a long stick and poked it free"
_CLIMB = "climbed up the tree and shook the branch"
_FLY = "flew up to the branch and pushed it loose with {friend_his} wings"


@dataclass(frozen=True)
class Kind:
    """What a character is: its noun, which name list it uses, its pronoun, how it helps."""

    noun: str
    names: str  # the StoryGrammar field with the names for this kind
    pronoun: Pronoun | None = None  # None: an animal, whose pronoun is chosen at random
    rescue: str = _POKE  # how it gets a toy down from a tree


GIRL = Kind("girl", "girl_names", SHE)
BOY = Kind("boy", "boy_names", HE)
KID = Kind("kid", "kid_names", THEY)


def _animal(noun: str, rescue: str = _POKE) -> Kind:
    return Kind(noun, "animal_names", None, rescue)


def article(word: str) -> str:
    """'a' or 'an' before ``word`` (the vowel rule is right for every word used here)."""
    return "an" if word[0] in "aeiou" else "a"


# ----------------------------------------------------------------------------------------
# The default word lists: {option: weight}; probability = weight / sum of the weights.
# Uneven weights make some stories likelier than others (and the entropy less trivial).
# Options at the same place must differ in their text, or the grammar becomes ambiguous.

# fmt: off
OPENINGS = {"Once upon a time, there was": 6, "Once upon a time, there lived": 2,
            "There was once": 2, "Long ago, there was": 1}
SIZES = {"little": 4, "": 3, "small": 1}
HEROES = {GIRL: 6, BOY: 6, KID: 2, _animal("bunny"): 2, _animal("fox"): 1,
          _animal("bear"): 1, _animal("mouse"): 1, _animal("hedgehog"): 1}
FRIENDS = {GIRL: 3, BOY: 3, KID: 1, _animal("squirrel", _CLIMB): 2, _animal("frog"): 2,
           _animal("owl", _FLY): 2, _animal("duck", _FLY): 1, _animal("puppy"): 2,
           _animal("kitten", _CLIMB): 2, _animal("monkey", _CLIMB): 1}
ANIMAL_PRONOUNS = {SHE: 2, HE: 2, THEY: 1}
GIRL_NAMES = {"Mia": 3, "Lily": 3, "Emma": 2, "Rosa": 2, "Nora": 2, "Ella": 2, "Zoe": 2,
              "Ava": 2, "Lucy": 2, "Ruby": 2, "Grace": 1, "Maya": 2, "Hannah": 1, "Sara": 1,
              "Chloe": 1, "Ivy": 1, "Amara": 1, "Leila": 1, "Priya": 1, "Mei": 1, "Sofia": 2,
              "Layla": 1, "Freya": 1, "Isla": 1, "Olivia": 2, "Yuki": 1, "Nina": 1,
              "Aisha": 1, "Clara": 1, "Hazel": 1}
BOY_NAMES = {"Tom": 3, "Ben": 3, "Leo": 2, "Max": 2, "Jack": 2, "Noah": 2, "Omar": 2,
             "Finn": 2, "Luca": 1, "Theo": 2, "Hugo": 1, "Ravi": 1, "Jonah": 1, "Eli": 1,
             "Oscar": 1, "Milo": 2, "Felix": 1, "Tariq": 1, "Kenji": 1, "Sami": 1, "Adam": 2,
             "Ethan": 1, "Arjun": 1, "Jonas": 1, "Mateo": 1, "Ivan": 1, "Liam": 2, "Kofi": 1,
             "Ollie": 1, "Rafael": 1}
KID_NAMES = {"Alex": 3, "Sam": 3, "Robin": 2, "Jamie": 2, "Riley": 2, "Charlie": 2,
             "Sky": 1, "Jordan": 1, "Quinn": 1, "Rowan": 1, "Frankie": 1, "Ash": 1,
             "Remy": 1, "Morgan": 1}
ANIMAL_NAMES = {"Pip": 3, "Hop": 2, "Bramble": 1, "Nibbles": 2, "Biscuit": 2, "Pebble": 2,
                "Fluff": 1, "Whiskers": 1, "Clover": 2, "Patch": 1, "Nutmeg": 1, "Toffee": 1,
                "Button": 2, "Maple": 1, "Dot": 1, "Sunny": 1, "Peanut": 2, "Ziggy": 1,
                "Bean": 1, "Tumble": 1, "Fern": 1, "Acorn": 1, "Mochi": 1, "Squeak": 1}
HUMAN_HOMES = {"in a small house at the edge of the woods": 3, "in a yellow house by the sea": 2,
               "in a busy town": 2, "on a farm with lots of cows": 2,
               "in a tall building in the city": 1, "in a little village by a river": 2}
ANIMAL_HOMES = {"in a cozy den under an old oak tree": 3, "in a hollow log by the river": 2,
                "at the edge of a big green forest": 2, "in a warm nest of leaves": 1}
COLORS = {"red": 4, "blue": 4, "green": 3, "yellow": 3, "purple": 2, "orange": 2, "pink": 2,
          "silver": 1, "golden": 1}
THINGS = {"kite": 4, "ball": 4, "teddy bear": 3, "toy boat": 2, "drum": 2, "picture book": 2,
          "whistle": 1, "toy train": 2, "balloon": 2, "yo-yo": 1, "toy robot": 2}
GIVERS = {"grandma": 3, "grandpa": 3, "mom": 2, "dad": 2, "aunt": 1, "uncle": 1}
WEATHERS = {"sunny": 4, "windy": 2, "bright": 2, "warm": 2, "cool": 1, "cloudy": 1}
TIMES = {"morning": 3, "afternoon": 2, "day": 2}
PLACES = {"park": 4, "beach": 2, "meadow": 2, "forest": 2, "lake": 2, "playground": 2,
          "garden": 2, "top of the hill": 1}
TRAITS = {"very friendly": 3, "a little shy": 2, "funny and kind": 2, "new in town": 1,
          "always happy": 1, "very curious": 1}
GREETINGS = {"Hello": 3, "Hi": 2, "Hi there": 1}
PLOTS = {"lost": 3, "stuck": 2, "share": 2, "storm": 2}
GAMES = {"look at the ducks": 2, "pick some flowers": 2, "play hide and seek": 2,
         "chase butterflies": 1, "eat their snacks": 1}
SPOTS = {"under the bench": 2, "behind a big rock": 2, "in the tall grass": 3,
         "near the pond": 1, "under a bush": 2, "by the old gate": 1,
         "inside a hollow log": 1, "in a pile of leaves": 1}
SHELTERS = {"under a big tree": 3, "inside an old shed": 1, "under a wooden bridge": 1,
            "in a little cave": 1}
# fmt: on


class _Writer:
    """Fills in the story's ``{placeholders}`` (names, pronouns, toy) for a chooser."""

    def __init__(self, ch: Chooser, variants: int | None):
        self.ch, self.variants = ch, variants
        self.words: dict[str, str] = {}

    def say(self, template: str) -> None:
        self.ch.say(template.format_map(self.words))

    def say_one(self, templates: Mapping[str, float]) -> str:
        """Write one of the options (a word list, or phrasings given by :meth:`phrase`)."""
        phrases = {t.format_map(self.words): w for t, w in templates.items()}
        if len(phrases) < len(templates):
            # two options would write the same text: the story would have two parses
            raise ValueError(f"ambiguous options, some write the same text: {list(templates)}")
        return self.ch.say_one(phrases)

    def phrase(self, templates: Mapping[str, float]) -> str:
        """Write one of several phrasings; a shrunken grammar keeps only the first few."""
        return self.say_one(dict(list(templates.items())[: self.variants]))

    def pick(self, options: Mapping[T, float]) -> T:
        return self.ch.pick(options)

    def character(self, role: str, name: str, pronoun: Pronoun) -> None:
        """Define {name} {he} {He} {him} {his} {His} {was} (or {friend}, {friend_he}, ...)."""
        prefix = "" if role == "name" else f"{role}_"
        self.words[role] = name
        for key, word in dataclasses.asdict(pronoun).items():
            self.words[prefix + key] = word
            self.words[(prefix + key).capitalize()] = word.capitalize()


def _default(options: dict) -> Any:
    """A dataclass field that starts as a fresh copy of ``options``."""
    return field(default_factory=lambda: dict(options))


@dataclass
class StoryGrammar:
    """The word lists and weights of the story grammar, and the program that uses them.

    Every field but ``variants`` is an ``{option: weight}`` dict: replace fields to change
    the stories, or :meth:`shrink` them to get a grammar small enough to enumerate.
    ``variants`` caps the alternative phrasings written inline in the program (None: all).
    """

    openings: dict[str, float] = _default(OPENINGS)
    sizes: dict[str, float] = _default(SIZES)
    heroes: dict[Kind, float] = _default(HEROES)
    friends: dict[Kind, float] = _default(FRIENDS)
    animal_pronouns: dict[Pronoun, float] = _default(ANIMAL_PRONOUNS)
    girl_names: dict[str, float] = _default(GIRL_NAMES)
    boy_names: dict[str, float] = _default(BOY_NAMES)
    kid_names: dict[str, float] = _default(KID_NAMES)
    animal_names: dict[str, float] = _default(ANIMAL_NAMES)
    human_homes: dict[str, float] = _default(HUMAN_HOMES)
    animal_homes: dict[str, float] = _default(ANIMAL_HOMES)
    colors: dict[str, float] = _default(COLORS)
    things: dict[str, float] = _default(THINGS)
    givers: dict[str, float] = _default(GIVERS)
    weathers: dict[str, float] = _default(WEATHERS)
    times: dict[str, float] = _default(TIMES)
    places: dict[str, float] = _default(PLACES)
    traits: dict[str, float] = _default(TRAITS)
    greetings: dict[str, float] = _default(GREETINGS)
    plots: dict[str, float] = _default(PLOTS)
    games: dict[str, float] = _default(GAMES)
    spots: dict[str, float] = _default(SPOTS)
    shelters: dict[str, float] = _default(SHELTERS)
    variants: int | None = None

    def word_lists(self) -> list[str]:
        """The names of the fields that hold ``{option: weight}`` word lists."""
        return [f.name for f in dataclasses.fields(self) if f.name != "variants"]

    def __post_init__(self) -> None:
        for name in self.word_lists():
            options = getattr(self, name)
            if not options or not all(w > 0 for w in options.values()):
                raise ValueError(
                    f"StoryGrammar.{name} needs at least one option, all with positive "
                    f"weights; got {options!r}"
                )
        if self.variants is not None and self.variants < 1:
            raise ValueError(f"StoryGrammar.variants must be None or at least 1, got {self.variants}")  # fmt: skip
        if unknown := [p for p in self.plots if not hasattr(self, f"_plot_{p}")]:
            raise ValueError(f"unknown plots {unknown}; the known plots are {list(PLOTS)}")
        # the friend's name must differ from the hero's, and the toy turns up in a new spot
        for name in ["spots", *{k.names for k in [*self.heroes, *self.friends]}]:
            if len(getattr(self, name)) < 2:
                raise ValueError(f"StoryGrammar.{name} needs at least 2 options")

    def shrink(self, keep: int = 1, variants: int | None = 1, **sizes: int) -> StoryGrammar:
        """A smaller grammar: the first ``keep`` options of every word list (``field=n``
        overrides it for one list; names and spots keep at least two) and the first
        ``variants`` phrasings of every sentence. Small enough to enumerate every story.
        """
        lists = self.word_lists()
        if unknown := set(sizes) - set(lists):
            raise ValueError(f"unknown StoryGrammar fields {sorted(unknown)}; known: {lists}")
        small: dict[str, Any] = {"variants": variants}
        for name in lists:
            n = sizes.get(name, keep)
            if name == "spots" or name.endswith("_names"):
                n = max(n, 2)
            small[name] = dict(list(getattr(self, name).items())[:n])
        return StoryGrammar(**small)

    # -- the story program -----------------------------------------------------------------

    def tell(self, ch: Chooser) -> None:
        """Write one story through the chooser ``ch`` (see the module docstring)."""
        w = _Writer(ch, self.variants)

        # The hero, their home, and the toy that the story is about.
        w.say_one(self.openings)
        w.say(" ")
        hero = self._introduce(w, "name", self.heroes, self.sizes)
        w.say(". {He} lived ")
        w.say_one(self.human_homes if hero.pronoun else self.animal_homes)  # animals: no house
        w.say(".")
        w.phrase({"": 3, " {He} {was} kind and curious.": 1, " {He} loved to sing.": 1})
        w.phrase({" {name} had ": 3, " {name}'s favorite toy was ": 1})
        color = w.pick(self.colors)
        w.words.update(color=color, a_color=f"{article(color)} {color}")
        w.say("{a_color} ")
        w.words["thing"] = w.say_one(self.things)
        w.say(".")
        w.phrase({" It was a present from {his} ": 3, " It was a birthday present from {his} ": 1})  # fmt: skip
        w.words["giver"] = w.say_one(self.givers)
        w.say(".")
        w.phrase({
            " {name} loved it very much.": 3,
            " {He} took it everywhere {he} went.": 2,
            " {He} played with it every day.": 2,
        })  # fmt: skip

        # A day out, and a friend.
        w.say("\n\nOne ")
        w.say_one(self.weathers)
        w.say(" ")
        w.words["time"] = w.say_one(self.times)
        w.words["place"] = w.pick(self.places)
        w.phrase({
            ", {name} took {his} {thing} to the {place}.": 2,
            ", {name} went to the {place} with {his} {thing}.": 1,
        })  # fmt: skip
        w.phrase({
            "": 3,
            " Birds were singing in the trees.": 1,
            " A soft breeze was blowing.": 1,
            " There were flowers everywhere.": 1,
        })  # fmt: skip
        w.phrase({" There, {he} met ": 3, " Soon, {he} met ": 1, " On the way, {he} met ": 1})
        self._introduce(w, "friend", self.friends, {"": 1}, avoid=w.words["name"])
        w.say(". {Friend_he} {friend_was} ")
        w.say_one(self.traits)
        w.say('.\n\n"')
        w.say_one(self.greetings)
        w.say('!" ')
        w.phrase({"said": 3, "called": 1})
        w.say(" {friend}. ")
        w.phrase({
            '"I like your {color} {thing}."': 2,
            '"What a lovely {thing}!"': 2,
            '"Is that your {thing}? It is so {color}!"': 1,
            '"Where did you get that {color} {thing}?"\n\n"My {giver} gave it to me," said {name}.': 1,
        })  # fmt: skip
        w.say("\n\n")

        # What happened next; every plot comes back to the hero's coloured toy at the end.
        plot = w.pick(self.plots)
        getattr(self, f"_plot_{plot}")(w)
        w.phrase({
            "": 4,
            " The end.": 1,
            " That night, {name} fell asleep with the {color} {thing} right next to {him}.": 1,
        })  # fmt: skip

    def _introduce(
        self,
        w: _Writer,
        role: str,
        kinds: Mapping[Kind, float],
        sizes: Mapping[str, float],
        avoid: str = "",
    ) -> Kind:
        """Write 'a little fox named Pip' and define the words for that character."""
        kind, size = w.pick(kinds), w.pick(sizes)
        words = f"{size} {kind.noun}" if size else kind.noun
        w.say(f"{article(words)} {words} named ")
        names = {n: weight for n, weight in getattr(self, kind.names).items() if n != avoid}
        name = w.say_one(names)
        w.character(role, name, kind.pronoun or w.pick(self.animal_pronouns))
        w.words[f"{role}_rescue"] = kind.rescue
        return kind

    def _plot_lost(self, w: _Writer) -> None:
        w.say("{name} and {friend} played with the {thing} all {time}.")
        w.phrase({" Then they ran off to ": 2, " Later, they went to ": 1})
        w.say_one(self.games)
        w.say(".")
        w.phrase({
            " When they came back, the {thing} was gone!": 2,
            " But when they came back, the {thing} was not there!": 1,
        })  # fmt: skip
        w.say("\n\n")
        w.phrase({
            '"Oh no!" cried {name}.': 2,
            '"Where did it go?" asked {name}.': 1,
            '"My {thing}!" cried {name}. "Where is it?"': 1,
        })  # fmt: skip
        w.phrase({
            " {He} {was} very sad.": 2,
            " {He} felt like crying.": 1,
            " Big tears rolled down {his} cheeks.": 1,
        })  # fmt: skip
        w.say(' "Don\'t worry," said {friend}. "')
        w.phrase({"I will help you look.": 2, "We will find it together.": 2, "Let's look for it.": 1})  # fmt: skip
        w.say('"')
        # Look in one to three places, never the same one twice, then find it in a new one.
        spots = dict(self.spots)
        n_looks = w.pick({n: weight for n, weight in {1: 1, 2: 3, 3: 1}.items() if n < len(spots)})
        for _ in range(n_looks):
            w.say(" They looked ")
            del spots[w.say_one(spots)]
            w.phrase({".": 2, ", but it was not there.": 1})
        # Who found it is written as a name, never a pronoun: both could be "she".
        w.say(" At last, ")
        w.phrase({"{friend}": 2, "{name}": 1})
        w.say(" found the {thing} ")
        w.say_one(spots)
        w.say('!\n\n{name} hugged {his} {color} {thing} and said, "Thank you, {friend}!"')
        w.phrase({
            " From that day on, {name} and {friend} were best friends.": 2,
            " After that, {name} never let the {color} {thing} out of {his} sight.": 1,
            " Then they walked home together, happy and tired.": 1,
        })  # fmt: skip

    def _plot_stuck(self, w: _Writer) -> None:
        w.say("{name} and {friend} played with the {thing} all {time}.")
        w.phrase({
            " Then a big gust of wind blew the {thing} up into a tall tree!": 2,
            " Suddenly, the wind picked up the {thing} and carried it into a tree!": 1,
        })  # fmt: skip
        w.phrase({
            " {name} jumped and jumped, but {he} could not reach it.": 2,
            " {name} stretched up high, but the branch was too far away.": 1,
        })  # fmt: skip
        w.say('\n\n"')
        w.phrase({"I can help!": 2, "Leave it to me!": 1, "Wait here, I have an idea!": 1})
        w.say('" said {friend}. {friend} ')
        w.say(w.words["friend_rescue"])
        w.phrase({
            ", and the {thing} fell down into {name}'s arms.": 2,
            ", and the {thing} dropped softly into the grass.": 1,
        })  # fmt: skip
        w.say("\n\n{name} held {his} {color} {thing} tight.")
        w.phrase({' "Thank you, {friend}!" {he} said.': 2, ' "You saved my {thing}!" {he} said.': 1})  # fmt: skip
        w.phrase({
            " After that, {name} and {friend} played together every day.": 2,
            " From then on, {name} held on to the {color} {thing} whenever the wind blew.": 1,
        })  # fmt: skip

    def _plot_share(self, w: _Writer) -> None:
        w.phrase({
            '"Can I play with your {thing}?" asked {friend}.': 2,
            '"May I have a turn with your {thing}?" asked {friend}.': 1,
        })  # fmt: skip
        w.say(" {name} held the {thing} close.")
        w.phrase({
            " {He} did not want to share.": 2,
            " It was {his} favorite thing, and {he} did not want to share it.": 1,
        })  # fmt: skip
        w.phrase({
            " {friend} looked down at {friend_his} feet and said nothing.": 2,
            " {Friend_he} looked so sad.": 1,
        })  # fmt: skip
        w.say(' Then {name} had an idea. "')
        w.phrase({"Let's play with it together!": 2, "We can take turns!": 1, "Let's share it!": 1})  # fmt: skip
        w.say('" {he} said.\n\n{name} and {friend} ')
        w.phrase({"took turns with": 1, "played with": 1})
        w.say(" the {thing} all {time}, and they laughed and laughed. When it was time to go home, {name} smiled.")  # fmt: skip
        w.phrase({
            " Sharing {his} {color} {thing} with {friend} was much more fun than playing alone.": 2,
            " {He} knew that the {color} {thing} was more fun with a friend.": 1,
            " {He} {was} glad {he} had shared the {color} {thing}.": 1,
        })  # fmt: skip

    def _plot_storm(self, w: _Writer) -> None:
        w.say("{name} and {friend} were playing with the {thing} when dark clouds filled the sky.")  # fmt: skip
        w.phrase({" Soon it began to rain.": 2, " Then came thunder and heavy rain!": 1})
        w.phrase({' "Quick, this way!" called {friend}.': 2, ' "Come on, let\'s hide!" said {friend}.': 1})  # fmt: skip
        w.say(" They ran and hid ")
        w.say_one(self.shelters)
        w.say(".")
        w.phrase({
            " {name} held the {thing} close to keep it dry.": 2,
            " {name} tucked the {thing} under {his} arm to keep it dry.": 1,
        })  # fmt: skip
        w.say("\n\n")
        w.phrase({
            '"I am scared of the thunder," said {friend} softly. "Me too," said {name}. "But we are safe here together."': 2,
            '"Are you scared?" asked {name}. "A little," said {friend}. "But not when you are here."': 1,
            "{name} and {friend} sat close together and listened to the rain.": 1,
        })  # fmt: skip
        w.say("\n\n")
        w.phrase({
            "Soon the rain stopped, and a rainbow filled the sky.": 2,
            "When the rain stopped, the sun came out again.": 1,
        })  # fmt: skip
        w.say(" {name} and {friend} walked home together, and the {color} {thing} ")
        w.phrase({"was still dry.": 2, "was safe and dry.": 1})


# ----------------------------------------------------------------------------------------
# Sampling, scoring and enumerating


def sample_story(rng: random.Random, grammar: StoryGrammar | None = None) -> tuple[str, float]:
    """Write one random story; return ``(text, log2 p(text))``."""
    sampler = _Sampler(rng)
    (grammar or DEFAULT_GRAMMAR).tell(sampler)
    return "".join(sampler.parts), sampler.log2p


def generate_stories(
    n_stories: int, seed: int = 0, grammar: StoryGrammar | None = None
) -> list[tuple[str, float]]:
    """Write ``n_stories`` stories with ``random.Random(seed)``: ``[(text, log2 p), ...]``.

    One generator is used in order, so the first k stories do not depend on ``n_stories``.
    """
    if n_stories < 1:
        raise ValueError(f"n_stories must be at least 1, got {n_stories}")
    rng = random.Random(seed)
    return [sample_story(rng, grammar) for _ in range(n_stories)]


def _search(grammar: StoryGrammar, target: str | None) -> Iterator[tuple[str, float] | int]:
    """Yield ``(text, log2p)`` for each complete run, or the position where a run failed."""
    queue: list[list[int]] = [[]]
    while queue:
        run = _Search(target, queue.pop(), queue)
        try:
            grammar.tell(run)
            if target is not None and run.pos != len(target):
                raise _DeadEnd  # the program finished but the text goes on
        except _DeadEnd:
            yield run.pos
            continue
        yield "".join(run.parts), run.log2p


def story_log2prob(story: str, grammar: StoryGrammar | None = None) -> float:
    """Return log2 p(story) under the grammar by parsing the text back into its choices.

    Raises ValueError if the grammar cannot write this text (pass one story, without the
    end-of-text marker), and RuntimeError if the grammar turns out to be ambiguous.
    """
    grammar = grammar or DEFAULT_GRAMMAR
    parses, furthest = [], 0
    for result in _search(grammar, story):
        if isinstance(result, int):
            furthest = max(furthest, result)
        else:
            parses.append(result[1])
    if not parses:
        hint = (
            " (pass one story at a time, without the end-of-text marker)" if "<|" in story else ""
        )
        raise ValueError(
            f"the story grammar cannot write this text{hint}; it stops matching near character "
            f"{furthest}: ...{story[max(0, furthest - 40) : furthest]!r} >>> {story[furthest : furthest + 40]!r}"
        )
    if len(parses) > 1:
        raise RuntimeError(
            f"the story grammar is ambiguous: {len(parses)} choice sequences write {story[:80]!r}..."
        )
    return parses[0]


def enumerate_stories(grammar: StoryGrammar, limit: int = 100_000) -> Iterator[tuple[str, float]]:
    """Yield every story the grammar can write as ``(text, probability)`` (small grammars only)."""
    for count, result in enumerate(_search(grammar, None)):
        if count >= limit:
            raise ValueError(f"more than {limit} stories; shrink the grammar (StoryGrammar.shrink)")
        text, log2p = result  # type: ignore[misc]  (no target: every run completes)
        yield text, 2.0**log2p


DEFAULT_GRAMMAR = StoryGrammar()
