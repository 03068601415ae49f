"""Toy language: deterministic corpus, exact tokenizer round trip, GPT-2-style year tokens."""

from __future__ import annotations

import random
import re

import pytest

from circuitgraph.toylang import templates as tp
from circuitgraph.toylang.corpus import CorpusConfig, ToyCorpus
from circuitgraph.toylang.lexicon import IOI_VERBS, NAMES_HELDOUT, SUBJECT_NOUNS_HELDOUT
from circuitgraph.toylang.tokenizer import build_tokenizer, wrap_tokenizer


def test_corpus_is_deterministic_in_seed() -> None:
    a = ToyCorpus(CorpusConfig(seed=3, seq_len=64)).tokens(16, offset=5)
    b = ToyCorpus(CorpusConfig(seed=3, seq_len=64)).tokens(16, offset=5)
    c = ToyCorpus(CorpusConfig(seed=4, seq_len=64)).tokens(16, offset=5)
    assert a.equal(b)
    assert not a.equal(c)
    # document i depends only on (seed, i): a batch starting later is a suffix of a longer batch
    assert ToyCorpus(CorpusConfig(seed=3, seq_len=64)).tokens(8, offset=13).equal(a[8:])


def test_corpus_has_no_unknown_words_and_starts_with_bos() -> None:
    corpus = ToyCorpus(CorpusConfig(seq_len=128))
    toks = corpus.tokens(64)
    assert (toks[:, 0] == corpus.bos_id).all()
    assert (toks != corpus.tokenizer.token_to_id("<unk>")).all()


def test_heldout_words_never_fill_tested_roles_in_training_text() -> None:
    corpus = ToyCorpus(CorpusConfig(seed=0))
    text = " ".join(corpus.texts(300))
    verbs = "|".join((*IOI_VERBS, "give"))
    ioi_answers = set(re.findall(rf"(?:{verbs}) (?:a|the) \w+ to (\w+)\.", text))
    assert ioi_answers and not ioi_answers & set(NAMES_HELDOUT)  # never the IOI answer
    for noun in SUBJECT_NOUNS_HELDOUT:
        for form in noun:
            assert f"The {form} that" not in text  # never an agreement subject
    assert "Bob" in text  # but held-out words do occur (in filler)


@pytest.mark.parametrize(
    "text",
    [
        "When Mary and John went to the store, John gave a drink to Mary.",
        "The war lasted from the year 1732 to the year 1745.",
        "The keys that the man holds are red. There are two keys here.",
    ],
)
def test_tokenizer_round_trip(text: str) -> None:
    tok = build_tokenizer()
    enc = tok.encode(text)
    assert 1 not in enc.ids  # no <unk>
    assert tok.decode(enc.ids) == text


def test_years_split_like_gpt2() -> None:
    tok = build_tokenizer()
    assert tok.encode(" 1732").tokens == ["Ġ17", "32"]


def test_transformer_lens_wrapper(default_model) -> None:
    model = default_model
    toks = model.to_tokens("When Mary and John went to the store")
    assert toks[0, 0].item() == model.tokenizer.bos_token_id
    assert model.to_string(toks[0, 1:]) == "When Mary and John went to the store"
    assert model.to_str_tokens(" 1732", prepend_bos=False) == [" 17", "32"]
    assert wrap_tokenizer(build_tokenizer()).get_vocab() == model.tokenizer.get_vocab()


def test_task_instances_align() -> None:
    rng = random.Random(0)
    for _ in range(50):
        inst = tp.ioi(rng, tp.HELDOUT_POOLS)
        assert inst.answers != inst.wrongs
        assert len(inst.prompt.split()) == len(inst.corrupted_prompt.split())
        gt = tp.greater_than(rng, tp.HELDOUT_POOLS)
        assert len(gt.answers) + len(gt.wrongs) == 100
