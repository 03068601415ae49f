"""Tokenizers read from ``tokenizer.json`` keep their own ids and special tokens; tokenizer-less
models refuse text with errors naming the fixes."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from circuitgraph.cli.main import main
from circuitgraph.errors import ModelLoadError
from circuitgraph.models import load_model, resolve_model, save_model
from circuitgraph.models.loading import DEFAULT_DICTS_DIR, DEFAULT_MODEL_DIR
from circuitgraph.models.tokenizer_files import load_tokenizer
from circuitgraph.toylang.tokenizer import BOS, UNK, build_tokenizer

from .conftest import STORIES_DIR

PROMPT = "Once upon a time, Lily saw a big dog."


def _word_level(tmp_path, vocab: dict[str, int], config: dict | None = None):
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>" if "<unk>" in vocab else None))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path / "tokenizer.json"


def test_default_model_tokenizer_is_unchanged(default_model) -> None:
    tok = default_model.tokenizer
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (BOS, BOS, BOS, UNK)
    assert (tok.bos_token_id, tok.unk_token_id, len(tok)) == (0, 1, build_tokenizer().get_vocab_size())
    text = "When Mary and John went to the store, John gave a drink to"
    assert default_model.to_tokens(text)[0].tolist() == [0, *build_tokenizer().encode(text).ids]


def test_a_512_token_tokenizer_drives_a_512_token_model(tmp_path, capsys) -> None:
    """The issue's case: stories260K (512 tokens) saved with its tokenizer.json and loaded back keeps
    its own BOS (id 1) instead of gaining a new id 512, and trace --prompt runs on the folder."""
    original = resolve_model(str(STORIES_DIR / "stories260K.bin"))
    folder = save_model(original, tmp_path / "stories")
    loaded = load_model(folder)
    assert len(loaded.tokenizer) == loaded.cfg.d_vocab == 512 and loaded.tokenizer.bos_token_id == 1
    toks = loaded.to_tokens(PROMPT)
    assert torch.equal(toks, original.to_tokens(PROMPT)) and toks[0, 0].item() == 1
    with torch.no_grad():
        assert torch.equal(loaded(toks), original(toks))
    text = tmp_path / "t.txt"
    text.write_text(" ".join([PROMPT, "Tom and Lily played in the park. They were happy."] * 40))
    dicts = tmp_path / "d"
    assert main(["--threads", "1", "train-dictionaries", "--model", str(folder), "--text", str(text), "--sites",
                 "transcoder", "--layers", "0,1", "--k", "4", "--expansion", "2", "--tokens", "2048",
                 "--batch-tokens", "256", "--seq-len", "32", "--chunk-sequences", "16", "--out", str(dicts)]) == 0
    assert main(["--threads", "1", "trace", "--model", str(folder), "--dicts", str(dicts), "--prompt", PROMPT,
                 "--describe-seqs", "0", "--out", str(tmp_path / "g")]) == 0, capsys.readouterr().err


def test_special_tokens_come_from_the_tokenizer_and_its_config(tmp_path, caplog) -> None:
    vocab = {"<unk>": 0, "<|endoftext|>": 1, "a": 2, "b": 3}
    # a Qwen-style config: no BOS (null), EOS <|endoftext|>; BOS falls back to the EOS
    tok = load_tokenizer(_word_level(tmp_path, vocab, {"bos_token": None, "eos_token": "<|endoftext|>"}))
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id, len(tok)) == (1, 1, 0, 1, 4)
    # a config naming a token the vocabulary lacks: ignored with a warning, never appended
    with caplog.at_level(logging.WARNING, logger="circuitgraph.models.tokenizer_files"):
        tok = load_tokenizer(_word_level(tmp_path, vocab, {"bos_token": "<bos>"}))
    assert "'<bos>' is not in its vocabulary" in caplog.text and len(tok) == 4 and tok.bos_token_id == 1
    assert tok.encode("a b") == [1, 2, 3]


def test_a_tokenizer_without_special_tokens_gains_none(tmp_path, caplog) -> None:
    (tmp_path / "bare").mkdir()
    with caplog.at_level(logging.WARNING, logger="circuitgraph.models.tokenizer_files"):
        tok = load_tokenizer(_word_level(tmp_path / "bare", {"a": 0, "b": 1, "c": 2}))
    assert "declares no BOS or EOS token; 'a' (id 0) starts each prompt" in caplog.text
    assert len(tok) == 3 and (tok.bos_token_id, tok.pad_token_id) == (0, 0) and tok.encode("b c") == [0, 1, 2]


def test_tokenizer_larger_than_the_model_is_refused(default_model, tmp_path) -> None:
    folder = save_model(default_model, tmp_path / "m")
    with pytest.raises(ModelLoadError, match="has 886 token ids but the model's vocabulary has 500"):
        load_tokenizer(folder / "tokenizer.json", d_vocab=500)
    cfg = json.loads((folder / "config.json").read_text())  # the same through load_model
    (folder / "config.json").write_text(json.dumps({**cfg, "d_vocab": 500, "d_vocab_out": 500}))
    with pytest.raises(ModelLoadError, match="belongs to another model"):
        load_model(folder)


@pytest.fixture(scope="module")
def bare_folder(tmp_path_factory):
    """The embedded model saved without its tokenizer.json."""
    folder = tmp_path_factory.mktemp("bare") / "m"
    shutil.copytree(DEFAULT_MODEL_DIR, folder)
    (folder / "tokenizer.json").unlink()
    return folder


def _error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(["--threads", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "AssertionError" not in err
    return err


def test_tokenizer_less_model_refuses_text_naming_the_fixes(bare_folder, tmp_path, capsys) -> None:
    assert resolve_model(str(bare_folder)).tokenizer is None
    text = tmp_path / "t.txt"
    text.write_text("When Mary and John went to the store, John gave a drink to Mary. " * 40)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "When Mary and John went to the store, John gave a drink to",
                                "answer": " Mary"}) + "\n")
    trace = ["trace", "--model", str(bare_folder), "--dicts", str(DEFAULT_DICTS_DIR), "--out", str(tmp_path / "g")]
    err = _error(capsys, [*trace, "--prompt", "When Mary and John went"])
    assert "--prompt is text" in err and "tokenizer.json" in err and "prompt_ids and answer_ids" in err
    for source in (["--task", "ioi", "--n", "4"], ["--dataset", str(rows)]):
        assert "tokenizer" in _error(capsys, [*trace, *source])
    train = ["train-dictionaries", "--model", str(bare_folder), "--sites", "transcoder", "--layers", "0",
             "--tokens", "2048", "--batch-tokens", "256", "--out", str(tmp_path / "d")]
    for argv in ([*train, "--text", str(text)],
                 ["dicts", "eval", "--model", str(bare_folder), "--dicts", str(DEFAULT_DICTS_DIR), "--text", str(text)]):
        err = _error(capsys, argv)
        assert "no tokenizer" in err and "tokenizer.json" in err and "--tokens-file" in err


def test_tokenizer_less_model_works_on_token_ids(bare_folder, default_model, default_dicts, tmp_path) -> None:
    """The fixes the errors name work: training from --tokens-file, and feature descriptions on ids."""
    from circuitgraph.features.descriptions import describe_features
    from circuitgraph.replacement import ReplacementModel
    from circuitgraph.toylang.corpus import ToyCorpus
    from dictionaries.site import Site

    corpus = ToyCorpus().sequences(0, 64)[:, :32]
    save_file({"tokens": corpus.contiguous()}, str(tmp_path / "tokens.safetensors"))
    assert main(["--threads", "1", "train-dictionaries", "--model", str(bare_folder), "--tokens-file",
                 str(tmp_path / "tokens.safetensors"), "--sites", "transcoder", "--layers", "0", "--k", "4",
                 "--expansion", "2", "--tokens", "2048", "--batch-tokens", "256", "--chunk-sequences", "16",
                 "--out", str(tmp_path / "d")]) == 0
    bare = resolve_model(str(bare_folder))
    site = Site(0, "transcoder")
    cards = describe_features(ReplacementModel(bare, {site: default_dicts[site]}), [(site, f) for f in range(8)],
                              corpus[:8], progress=False)
    named = describe_features(ReplacementModel(default_model, {site: default_dicts[site]}),
                              [(site, f) for f in range(8)], corpus[:8], progress=False)
    assert cards.keys() == named.keys() and sum(len(c.contexts) for c in cards.values()) > 0
    for key, card in cards.items():  # the same contexts, shown as ids instead of text
        for ours, theirs in zip(card.contexts, named[key].contexts, strict=True):
            assert ours.activations == theirs.activations and all(t.isdigit() for t in ours.tokens)
            assert [default_model.tokenizer.decode([int(t)]) for t in ours.tokens] == theirs.tokens


def test_a_tokenizer_that_raises_on_unknown_words_gives_a_clear_error(tmp_path) -> None:
    """A word-level vocabulary without an unknown token raises inside ``tokenizers``; the prompt, a
    dataset row and an answer each get a one-line error naming them instead."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from circuitgraph.api import prompt_tokens
    from circuitgraph.errors import TaskError
    from circuitgraph.tasks.dataset import single_token_id
    from circuitgraph.tasks.files import dataset_from_rows

    vocab = {w: i for i, w in enumerate(["<s>", "the", "cat", "sat", "mat", "on"])}
    raw = Tokenizer(models.WordLevel(vocab))  # no unk_token: unknown words raise
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path, d_vocab=len(vocab))
    cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=16, d_head=4, d_vocab=len(vocab), attn_only=True,
                                  act_fn="relu", default_prepend_bos=True)
    model = HookedTransformer(cfg, tokenizer=tok)
    assert prompt_tokens(model, "the cat sat on the").tolist() == [[0, 1, 2, 3, 5, 1]]
    with pytest.raises(TaskError, match="could not encode the prompt"):
        prompt_tokens(model, "the dog sat")
    with pytest.raises(TaskError, match="could not encode records row 1: 'prompt'"):
        dataset_from_rows([{"prompt": "the dog sat on the", "answer": "mat"}], model)
    with pytest.raises(TaskError, match="could not encode answer 'dog'"):
        single_token_id(model, "dog")
