"""A TinyStories-style task for small story models (e.g. llama2.c's stories260K): recall the name
of the story's character when the story comes back to them.

A character is introduced by name; later the story reaches a point where that name comes next.
The metric contrasts the character's name with the other name, which never appears; the
corrupted prompt tells the same story about the other name, so the two trade places. Names must be single
tokens of the model: ``Lily`` and ``Tim`` are in stories260K's 512-piece vocabulary.
"""

from __future__ import annotations

import random

from circuitgraph.toylang.templates import TaskInstance, WordPools

STORY_NAMES = ("Lily", "Tim")
_TEMPLATES = (
    "Once upon a time, there was a little girl named {A}. She loved to play in the {place} with her {obj}. One day,",
    "Once upon a time, there was a kid named {A}. Every day, {A} played with a {obj} in the {place}. One day,",
    "There was a child named {A}. The {obj} was in the {place}. The child's name was",
    "Once upon a time, there was a little girl named {A}. She had a {obj}. The {obj} was red. Then",
)
_PLACES = ("park", "garden", "house", "forest", "school")
_OBJECTS = ("ball", "toy", "book", "flower", "cake")


def story_names(rng: random.Random, pools: WordPools | None = None) -> TaskInstance:
    """One story prompt; the answer is the character named earlier (``B`` is the name not in the story)."""
    a, b = rng.sample(STORY_NAMES, 2)
    template = rng.choice(_TEMPLATES)
    words = {"place": rng.choice(_PLACES), "obj": rng.choice(_OBJECTS)}
    prompt = template.format(A=a, **words)
    corrupted = template.format(A=b, **words)
    return TaskInstance(prompt, (a,), (b,), corrupted, f" {a}")
