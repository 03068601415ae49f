"""Word lists of the toy language, and which words are held out of which roles.

Every word here is one token of the toy tokenizer (see :mod:`circuitgraph.toylang.tokenizer`).
"Held out" words still occur in the training corpus, but only in filler sentences, never in the
role a task tests (an IOI name is never the indirect object of a training IOI sentence, an
agreement noun is never the subject of a training relative-clause sentence, and so on). Task
datasets built with ``split="heldout"`` use only held-out words in those roles, so the metrics
measure a mechanism rather than memorised sentences.
"""

from __future__ import annotations

from typing import NamedTuple

NAMES_TRAIN: tuple[str, ...] = (
    "Mary", "John", "Tom", "Anna", "James", "Sarah", "Paul", "Emma", "David", "Lucy",
    "Mark", "Alice", "Peter", "Kate", "Sam", "Laura", "Mike", "Rose", "Adam", "Julia",
    "Ben", "Claire", "Dan", "Grace", "Jack", "Helen", "Leo", "Jane", "Max", "Amy",
    "Luke", "Ruth", "Carl", "Nina", "Fred", "Olga", "Hugo", "Vera", "Ivan", "Zoe",
)
NAMES_HELDOUT: tuple[str, ...] = (
    "Bob", "Lily", "Oscar", "Ella", "Victor", "Mia", "Felix", "Ida",
    "Simon", "Eva", "Noah", "Iris", "Arthur", "Nora", "Ralph", "Tina",
)
OBJECTS: tuple[str, ...] = (
    "drink", "book", "ball", "letter", "gift", "apple", "pencil", "ring", "hat", "map",
    "cake", "coin", "flower", "lamp", "cup", "bag", "toy", "card", "note", "box",
)
PLACES: tuple[str, ...] = (
    "store", "park", "school", "garden", "market", "library", "station", "beach",
    "museum", "hospital", "river", "office", "kitchen", "church", "farm", "cafe",
)
IOI_VERBS: tuple[str, ...] = ("gave", "handed", "passed", "sent", "showed", "brought", "threw", "offered")


class NounPair(NamedTuple):
    """A noun in its singular and plural form."""

    singular: str
    plural: str


SUBJECT_NOUNS_TRAIN: tuple[NounPair, ...] = tuple(
    NounPair(s, p)
    for s, p in (
        ("key", "keys"), ("dog", "dogs"), ("cat", "cats"), ("chair", "chairs"), ("door", "doors"),
        ("window", "windows"), ("car", "cars"), ("house", "houses"), ("tree", "trees"),
        ("bird", "birds"), ("horse", "horses"), ("shoe", "shoes"), ("table", "tables"),
        ("picture", "pictures"), ("song", "songs"), ("road", "roads"), ("bottle", "bottles"),
        ("clock", "clocks"), ("plate", "plates"), ("boat", "boats"), ("phone", "phones"),
        ("bike", "bikes"), ("coat", "coats"), ("bed", "beds"),
    )
)
SUBJECT_NOUNS_HELDOUT: tuple[NounPair, ...] = tuple(
    NounPair(s, p)
    for s, p in (
        ("desk", "desks"), ("train", "trains"), ("cow", "cows"), ("glass", "glasses"),
        ("shirt", "shirts"), ("wall", "walls"), ("bridge", "bridges"), ("stone", "stones"),
    )
)
ATTRACTOR_NOUNS: tuple[NounPair, ...] = tuple(
    NounPair(s, p)
    for s, p in (
        ("man", "men"), ("woman", "women"), ("boy", "boys"), ("girl", "girls"),
        ("doctor", "doctors"), ("farmer", "farmers"), ("teacher", "teachers"),
        ("child", "children"), ("friend", "friends"), ("baker", "bakers"),
    )
)


class VerbPair(NamedTuple):
    """A transitive verb in its third-person singular and plural present form."""

    singular: str
    plural: str


RELATIVE_VERBS: tuple[VerbPair, ...] = tuple(
    VerbPair(s, p)
    for s, p in (
        ("holds", "hold"), ("likes", "like"), ("sees", "see"), ("finds", "find"),
        ("wants", "want"), ("keeps", "keep"), ("paints", "paint"), ("cleans", "clean"),
        ("loves", "love"), ("needs", "need"),
    )
)
ADJECTIVES: tuple[str, ...] = (
    "red", "blue", "green", "old", "new", "big", "small", "heavy", "broken", "clean",
    "dirty", "bright", "dark", "warm", "cold", "quiet", "loud", "soft", "strange", "happy",
)
EVENTS_TRAIN: tuple[str, ...] = (
    "war", "reign", "expedition", "drought", "journey", "project", "festival", "strike",
    "campaign", "voyage", "famine", "treaty", "siege", "era", "dynasty", "boom",
)
EVENTS_HELDOUT: tuple[str, ...] = ("crisis", "flood", "revolt", "plague", "rebellion", "exile")
CENTURIES: tuple[str, ...] = tuple(str(c) for c in range(11, 20))
TWO_DIGITS: tuple[str, ...] = tuple(f"{i:02d}" for i in range(100))
FILLER_VERBS_PAST: tuple[str, ...] = (
    "saw", "found", "liked", "wanted", "bought", "painted", "lost", "kept", "cleaned", "needed",
)
FILLER_WORDS: tuple[str, ...] = (
    "the", "a", "an", "and", "to", "of", "in", "at", "on", "was", "were", "is", "are", "had", "has",
    "have", "went", "When", "Then", "After", "Afterwards", "While", "The", "There", "It", "In",
    "that", "two", "three", "many", "some", "one", "very", "year", "from", "lasted", "began",
    "ended", "started", "until", "by", "with", "later", "smiled", "laughed", "slept", "played",
    "happy", "sad", "tired", "here", "there", "said", "hello", "loved", "felt", "day", "morning",
    "evening", "walked", "home", "back", "again", "so", "decided", "give", "it", "he", "she",
    "they", "He", "She", "They", "his", "her", "their", "together", "for", "long", "time",
    "when", "arrived", "near", "met", "belonged", "Later",
)
PUNCTUATION: tuple[str, ...] = (".", ",")


def all_words() -> list[str]:
    """Every word of the language, each once, in a fixed order (the tokenizer's vocabulary)."""
    words: list[str] = []
    groups: list[tuple[str, ...]] = [
        NAMES_TRAIN, NAMES_HELDOUT, OBJECTS, PLACES, IOI_VERBS, ADJECTIVES, EVENTS_TRAIN,
        EVENTS_HELDOUT, FILLER_VERBS_PAST, FILLER_WORDS,
    ]
    for pairs in (SUBJECT_NOUNS_TRAIN, SUBJECT_NOUNS_HELDOUT, ATTRACTOR_NOUNS, RELATIVE_VERBS):
        groups.append(tuple(w for pair in pairs for w in pair))
    seen: set[str] = set()
    for group in groups:
        for word in group:
            if word not in seen:
                seen.add(word)
                words.append(word)
    return words
