"""Sentence templates of the toy language: task sentences (with answers and corruptions) and filler.

Task builders return a :class:`TaskInstance`: the prompt up to the answer, the answer and the
wrong answer(s) as token strings, the corrupted prompt used for activation patching, and the rest
of the sentence. The corpus writes ``prompt + completion``; the task datasets use the parts.
The same builders serve both, so the model is evaluated on exactly the structures it trained on,
with held-out words in the tested roles.
"""

from __future__ import annotations

import random
from typing import NamedTuple

from circuitgraph.toylang import lexicon as lx


class TaskInstance(NamedTuple):
    """One task sentence split at the predicted token."""

    prompt: str
    """Text up to (not including) the answer."""
    answers: tuple[str, ...]
    """Correct next-token strings (one for IOI/agreement/induction, several for greater-than)."""
    wrongs: tuple[str, ...]
    """Incorrect next-token strings the metric contrasts with."""
    corrupted_prompt: str
    """Same-length prompt whose correct answer differs (for patching and ablation baselines)."""
    completion: str
    """What the corpus writes after the prompt: one correct answer and the end of the sentence."""


class WordPools(NamedTuple):
    """Which words fill the tested roles (training pools or held-out pools)."""

    names: tuple[str, ...]
    subjects: tuple[lx.NounPair, ...]
    events: tuple[str, ...]


TRAIN_POOLS = WordPools(lx.NAMES_TRAIN, lx.SUBJECT_NOUNS_TRAIN, lx.EVENTS_TRAIN)
HELDOUT_POOLS = WordPools(lx.NAMES_HELDOUT, lx.SUBJECT_NOUNS_HELDOUT, lx.EVENTS_HELDOUT)
ALL_NAMES = lx.NAMES_TRAIN + lx.NAMES_HELDOUT
ALL_SUBJECTS = lx.SUBJECT_NOUNS_TRAIN + lx.SUBJECT_NOUNS_HELDOUT
ALL_EVENTS = lx.EVENTS_TRAIN + lx.EVENTS_HELDOUT

_IOI_TEMPLATES = (
    "When {A} and {B} went to the {place}, {S} {verb} a {obj} to",
    "Then, {A} and {B} had a long day at the {place}. {S} {verb} a {obj} to",
    "After {A} and {B} went to the {place}, {S} decided to give a {obj} to",
    "While {A} and {B} were at the {place}, {S} {verb} the {obj} to",
    "When {A} and {B} walked to the {place}, {S} {verb} a {obj} to",
    "The {place} was quiet when {A} and {B} arrived. {S} {verb} a {obj} to",
)


def ioi(rng: random.Random, pools: WordPools) -> TaskInstance:
    """Indirect object identification: the repeated name is the subject, the other is the answer."""
    io, s = rng.sample(pools.names, 2)
    template = rng.choice(_IOI_TEMPLATES)
    first, second = (io, s) if rng.random() < 0.5 else (s, io)  # ABBA and BABA orders
    fields = {"A": first, "B": second, "place": rng.choice(lx.PLACES),
              "verb": rng.choice(lx.IOI_VERBS), "obj": rng.choice(lx.OBJECTS)}
    prompt = template.format(S=s, **fields)
    corrupted = template.format(S=io, **fields)  # names swapped: the other name is now repeated
    return TaskInstance(prompt, (" " + io,), (" " + s,), corrupted, f" {io}.")


def agreement(rng: random.Random, pools: WordPools) -> TaskInstance:
    """Subject-verb agreement across a relative clause whose noun may have the other number."""
    subject = rng.choice(pools.subjects)
    attractor = rng.choice(lx.ATTRACTOR_NOUNS)
    verb = rng.choice(lx.RELATIVE_VERBS)
    plural = rng.random() < 0.5
    attr_plural = rng.random() < 0.5
    inner = (
        f"the {attractor.plural} {verb.plural}" if attr_plural else f"the {attractor.singular} {verb.singular}"
    )
    if rng.random() < 0.25:
        name = rng.choice(ALL_NAMES)
        inner = f"{name} {verb.singular}"

    def sentence(is_plural: bool) -> str:
        noun = subject.plural if is_plural else subject.singular
        return f"The {noun} that {inner}"

    right, wrong = (" are", " is") if plural else (" is", " are")
    completion = right + " " + rng.choice(lx.ADJECTIVES) + "."
    return TaskInstance(sentence(plural), (right,), (wrong,), sentence(not plural), completion)


_GT_TEMPLATES = (
    "The {event} lasted from the year {c}{yy} to the year {c}",
    "The {event} started in the year {c}{yy} and ended in the year {c}",
    "The {event} began in {c}{yy} and lasted until {c}",
)


def greater_than(rng: random.Random, pools: WordPools) -> TaskInstance:
    """Greater-than over years: the end year's last two digits exceed the start year's."""
    event = rng.choice(pools.events)
    century = rng.choice(lx.CENTURIES)
    start = rng.randint(2, 98)
    end = rng.randint(start + 1, 99)
    template = rng.choice(_GT_TEMPLATES)
    prompt = template.format(event=event, c=century, yy=f"{start:02d}")
    corrupted = template.format(event=event, c=century, yy="01")
    answers = tuple(f"{y:02d}" for y in range(start + 1, 100))
    wrongs = tuple(f"{y:02d}" for y in range(0, start + 1))
    return TaskInstance(prompt, answers, wrongs, corrupted, f"{end:02d}.")


def random_span(rng: random.Random, length: int) -> list[str]:
    """A span of random words (each with its leading space), the raw material of induction."""
    vocab = lx.all_words()
    return [" " + w for w in rng.choices(vocab, k=length)]


def induction(rng: random.Random, span_len: int = 10, corrupt: str = "answer") -> TaskInstance:
    """Induction: a random span, then its repetition cut at a random point.

    The answer is the word that followed the current word in the first occurrence; the wrong
    answer is another random word. ``corrupt="answer"`` (a minimal pair, like the other tasks):
    the corrupted prompt has the wrong word in the answer's place in the first occurrence, so it
    predicts the wrong word by the same mechanism. ``corrupt="span"``: the whole first occurrence
    is replaced by other random words (everything before the repetition changes).
    """
    span = random_span(rng, span_len)
    other = random_span(rng, span_len)
    cut = rng.randint(1, span_len - 1)  # predict span[cut] from span[:cut] repeated
    prompt = "".join(span) + "".join(span[:cut])
    wrong = other[cut] if other[cut] != span[cut] else other[cut - 1]
    if corrupt == "span":
        first = other
    elif corrupt == "answer":
        first = span[:cut] + [wrong] + span[cut + 1 :]
    else:
        raise ValueError(f"corrupt must be 'answer' or 'span', got {corrupt!r}")
    corrupted = "".join(first) + "".join(span[:cut])
    return TaskInstance(prompt, (span[cut],), (wrong,), corrupted, "".join(span[cut:]))


def filler(rng: random.Random) -> str:
    """One filler sentence (or short story) using every word class, held-out words included."""
    name, other = rng.sample(ALL_NAMES, 2)
    noun = rng.choice(ALL_SUBJECTS + lx.ATTRACTOR_NOUNS)
    person = rng.choice(lx.ATTRACTOR_NOUNS)
    verb = rng.choice(lx.RELATIVE_VERBS)
    adj = rng.choice(lx.ADJECTIVES)
    place = rng.choice(lx.PLACES)
    obj = rng.choice(lx.OBJECTS)
    past = rng.choice(lx.FILLER_VERBS_PAST)
    year = f"{rng.choice(lx.CENTURIES)}{rng.randint(0, 99):02d}"
    event = rng.choice(ALL_EVENTS)
    count = rng.choice(("two", "three", "many", "some"))
    options = (
        f"{name} went to the {place}.",
        f"{name} has a {obj}.",
        f"{name} {past} a {noun.singular}.",
        f"{name} {past} {count} {noun.plural}.",
        f"The {noun.singular} is {adj}.",
        f"The {noun.plural} are {adj}.",
        f"The {noun.singular} near the {person.plural} is {adj}.",
        f"The {noun.plural} near the {person.singular} are {adj}.",
        f"The {noun.singular} with the {noun.plural} is {adj}.",
        f"There is a {noun.singular} here.",
        f"There are {count} {noun.plural} here.",
        f"The {person.singular} {verb.singular} the {noun.singular}.",
        f"The {person.plural} {verb.plural} the {noun.plural}.",
        f"{name} and {other} played in the {place}. {name} found a {obj}. {other} smiled.",
        f"{name} said hello and {other} laughed. {name} walked home.",
        f"{name} had a {adj} {obj}. {name} loved it.",
        f"{name} was at the {place}. Then {name} {past} a {obj}. {name} smiled.",
        f"{name} met {other} at the {place}. {name} and {other} walked home together.",
        f"{name} had a {obj}. The {obj} was {adj}. It belonged to {name}.",
        f"The {place} was quiet. {name} was there. Later, the {obj} went back to {name}.",
        f"In {year}, the {event} began.",
        f"The {event} ended in {year}.",
        f"{name} felt {rng.choice(('happy', 'sad', 'tired'))} that day.",
    )
    return rng.choice(options)
