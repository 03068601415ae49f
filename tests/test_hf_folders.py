"""Local Hugging Face model folders as ``--model``: converted by TransformerLens and checked against
the ``transformers`` model's own logits and tokenizer; refusals; ``trace`` end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers as tr
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from circuitgraph.cli.main import main
from circuitgraph.errors import ModelLoadError
from circuitgraph.models import load_model, resolve_model, save_model
from circuitgraph.models.hf_folder import SUPPORTED_ARCHITECTURES

TEXT = [
    "Once upon a time there was a little fox who lived in the forest near a river.",
    "The fox liked to run and play with the birds, and every morning it drank from the river.",
    "One day a girl named Mary and a boy named John walked to the store to buy bread and milk.",
    "When Mary and John went to the store, John gave a drink to Mary.",
    "The keys that the man holds are on the table. The year 1732 came before the year 1745.",
] * 20
PROMPT = "When Mary and John went to the store, John gave a drink to"
SMALL = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
             max_position_embeddings=64)
CONFIGS = {  # tiny random models, one per supported architecture
    "GPT2LMHeadModel": lambda v: tr.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=v,
                                                bos_token_id=0, eos_token_id=0),
    "GPTNeoForCausalLM": lambda v: tr.GPTNeoConfig(num_layers=2, hidden_size=64, num_heads=4, vocab_size=v,
                                                    max_position_embeddings=64, window_size=16,
                                                    attention_types=[[["global", "local"], 1]]),
    "GPTNeoXForCausalLM": lambda v: tr.GPTNeoXConfig(**SMALL, vocab_size=v),
    "LlamaForCausalLM": lambda v: tr.LlamaConfig(**SMALL, num_key_value_heads=2, vocab_size=v, bos_token_id=1,
                                                  eos_token_id=2),
    "MistralForCausalLM": lambda v: tr.MistralConfig(**SMALL, num_key_value_heads=2, vocab_size=v, sliding_window=None),
    "OPTForCausalLM": lambda v: tr.OPTConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, ffn_dim=128,
                                              max_position_embeddings=64, word_embed_proj_dim=64, vocab_size=v),
    "Qwen2ForCausalLM": lambda v: tr.Qwen2Config(**SMALL, num_key_value_heads=2, vocab_size=v),
    "Qwen3ForCausalLM": lambda v: tr.Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=16, vocab_size=v),
}


def gpt2_tokenizer(vocab: int = 320) -> tr.PreTrainedTokenizerFast:
    """A byte-level BPE trained on TEXT, GPT-2's conventions (``<|endoftext|>`` is BOS and EOS)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tr.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def llama_tokenizer(vocab: int = 200) -> tr.PreTrainedTokenizerFast:
    """A SentencePiece-style BPE with ``<unk>``, ``<s>``, ``</s>``; its post-processor prepends ``<s>``."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                                      show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tr.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def write_folder(folder: Path, arch: str, vocab: int, tokenizer=None, **save_kwargs) -> torch.nn.Module:
    """A randomly initialised ``arch`` saved by transformers into ``folder``; returns the model."""
    torch.manual_seed(0)
    model = getattr(tr, arch)(CONFIGS[arch](vocab)).eval()
    model.save_pretrained(folder, **save_kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    tok = gpt2_tokenizer()
    folder = tmp_path_factory.mktemp("hf") / "not-a-llama-gpt2"  # TransformerLens alone would read "llama" here
    return folder, write_folder(folder, "GPT2LMHeadModel", len(tok), tok)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    tok = llama_tokenizer()
    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    return folder, write_folder(folder, "LlamaForCausalLM", len(tok), tok)


def _hf_logits(hf_model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(tokens).logits


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
def test_every_supported_architecture_reproduces_transformers_logits(arch, tmp_path) -> None:
    """Converted logits equal transformers'; saving in our own format and loading back changes nothing."""
    hf_model = write_folder(tmp_path / arch, arch, vocab=300)
    model = resolve_model(str(tmp_path / arch))
    assert model.cfg.original_architecture == arch and model.cfg.d_vocab == 300 and model.tokenizer is None
    tokens = torch.randint(0, 300, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens)
        assert (ours - _hf_logits(hf_model, tokens)).abs().max().item() < 1e-4
        assert torch.equal(load_model(save_model(model, tmp_path / "saved"))(tokens), ours)  # our format keeps it


def test_gpt2_folder_text_and_logits(gpt2_folder) -> None:
    folder, hf_model = gpt2_folder
    model = resolve_model(str(folder))
    reference = tr.AutoTokenizer.from_pretrained(folder)  # transformers' own reading of the folder
    assert len(model.tokenizer) == len(reference) == model.cfg.d_vocab == 320  # no ids appended
    toks = model.to_tokens(PROMPT)
    assert toks[0, 0].item() == reference.convert_tokens_to_ids("<|endoftext|>")  # BOS = its own <|endoftext|>
    assert toks[0, 1:].tolist() == reference(PROMPT).input_ids
    assert model.to_string(toks[0, 1:]) == PROMPT
    with torch.no_grad():
        ours = model(toks)
    assert (ours - _hf_logits(hf_model, toks)).abs().max().item() < 1e-4


def test_llama_folder_text_and_logits(llama_folder) -> None:
    folder, hf_model = llama_folder
    model = resolve_model(str(folder))
    reference = tr.AutoTokenizer.from_pretrained(folder)
    assert len(model.tokenizer) == model.cfg.d_vocab == len(reference)
    toks = model.to_tokens(PROMPT)
    assert toks[0].tolist() == reference(PROMPT).input_ids and toks[0, 0].item() == 1  # <s> from its own template
    assert model.cfg.n_key_value_heads == 2  # grouped-query attention kept
    with torch.no_grad():
        ours = model(toks)
    assert (ours - _hf_logits(hf_model, toks)).abs().max().item() < 1e-4


def test_sharded_safetensors_folder(tmp_path) -> None:
    hf_model = write_folder(tmp_path / "m", "LlamaForCausalLM", vocab=300, max_shard_size="40KB")
    assert (tmp_path / "m" / "model.safetensors.index.json").is_file() and not (tmp_path / "m" / "model.safetensors").exists()
    tokens = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (resolve_model(str(tmp_path / "m"))(tokens) - _hf_logits(hf_model, tokens)).abs().max().item() < 1e-4


def test_config_with_model_type_only(tmp_path) -> None:
    hf_model = write_folder(tmp_path / "m", "GPT2LMHeadModel", vocab=300)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    del cfg["architectures"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    tokens = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (resolve_model(str(tmp_path / "m"))(tokens) - _hf_logits(hf_model, tokens)).abs().max().item() < 1e-4


def test_refusals(gpt2_folder, tmp_path) -> None:
    folder, _ = gpt2_folder
    with pytest.raises(ModelLoadError, match="is a Hugging Face model folder; load it with resolve_model"):
        load_model(folder)  # our own saved-folder reader names the right one
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="BertForMaskedLM.*supported architectures: GPT2LMHeadModel"):
        resolve_model(str(bert))
    pickled = tmp_path / "pickled"  # weights only as a pickle: refused before the file is opened
    pickled.mkdir()
    (pickled / "config.json").write_text((folder / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ModelLoadError, match="pytorch_model.bin.*safetensors only.*save_pretrained"):
        resolve_model(str(pickled))
    big_tok = tmp_path / "big_tok"  # a 320-token tokenizer beside a 300-token model
    write_folder(big_tok, "GPT2LMHeadModel", vocab=300, tokenizer=gpt2_tokenizer())
    with pytest.raises(ModelLoadError, match="320 token ids but the model's vocabulary has 300"):
        resolve_model(str(big_tok))
    wide = tmp_path / "wide"  # n_inner, which TransformerLens's GPT-2 mapping ignores
    torch.manual_seed(0)
    tr.GPT2LMHeadModel(tr.GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=32, vocab_size=50, n_inner=48)).save_pretrained(wide)
    with pytest.raises(ModelLoadError, match="do not fit its config.*not supported"):
        resolve_model(str(wide))
    scaled = tmp_path / "scaled"  # linear RoPE scaling: mapped silently wrong by TransformerLens, caught by the check
    torch.manual_seed(0)
    tr.LlamaForCausalLM(tr.LlamaConfig(**SMALL, vocab_size=50, rope_scaling={"rope_type": "linear", "factor": 8.0})).save_pretrained(scaled)
    with pytest.raises(ModelLoadError, match="does not reproduce its logits"):
        resolve_model(str(scaled))


def test_trace_end_to_end_on_a_hf_folder(gpt2_folder, tmp_path, capsys) -> None:
    """train-dictionaries on text, then trace --prompt, both through the CLI, on the converted GPT-2."""
    folder, hf_model = gpt2_folder
    text = tmp_path / "t.txt"
    text.write_text(" ".join(TEXT))
    dicts = tmp_path / "d"
    assert main(["--threads", "1", "train-dictionaries", "--model", str(folder), "--text", str(text),
                 "--sites", "attn_z,transcoder", "--k", "4", "--expansion", "2", "--tokens", "4096",
                 "--batch-tokens", "512", "--seq-len", "32", "--chunk-sequences", "32", "--out", str(dicts)]) == 0
    capsys.readouterr()
    assert main(["--threads", "1", "trace", "--model", str(folder), "--dicts", str(dicts), "--prompt", PROMPT,
                 "--answer", " Mary", "--contrast", " John", "--describe-seqs", "4", "--out", str(tmp_path / "g"),
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n_nodes"] > 1 and summary["metric"] == "logit_diff" and summary["forward_passes"] > 0
    ref = tr.AutoTokenizer.from_pretrained(folder)  # the graph explains transformers' own logit difference
    bos, mary, john = (ref.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "ĠMary", "ĠJohn"))
    last = _hf_logits(hf_model, torch.tensor([[bos, *ref(PROMPT).input_ids]]))[0, -1]
    assert summary["metric_value"] == pytest.approx((last[mary] - last[john]).item(), abs=1e-4)
    from circuitgraph.graph.graph import Graph

    graph = Graph.load(tmp_path / "g")
    assert graph.metadata["model"] == str(folder) and any(n.kind == "feature" for n in graph.nodes)
    # the dictionaries belong to the weights, not to the folder's name: a renamed copy keeps them ...
    moved = tmp_path / "renamed-model"
    shutil.copytree(folder, moved)
    capsys.readouterr()
    assert main(["--threads", "1", "trace", "--model", str(moved), "--dicts", str(dicts), "--prompt", PROMPT,
                 "--answer", " Mary", "--contrast", " John", "--describe-seqs", "0", "--out", str(tmp_path / "g2"),
                 "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (again["n_nodes"], again["metric_value"]) == (summary["n_nodes"], summary["metric_value"])
    # ... and other weights under the same folder name do not adopt them
    impostor = tmp_path / "elsewhere" / folder.name
    shutil.copytree(folder, impostor)
    torch.manual_seed(1)
    tr.GPT2LMHeadModel(hf_model.config).save_pretrained(impostor)
    assert main(["--threads", "1", "trace", "--model", str(impostor), "--dicts", str(dicts), "--prompt", PROMPT,
                 "--describe-seqs", "0", "--out", str(tmp_path / "g3")]) == 2
    err = capsys.readouterr().err
    assert "was trained on model" in err and folder.name in err


def test_model_identity_rules() -> None:
    from dictionaries.model_identity import same_model, weights_fingerprint

    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    assert weights_fingerprint(a) == weights_fingerprint(a) != weights_fingerprint(b)
    fa, fb = weights_fingerprint(a), weights_fingerprint(b)
    assert same_model(f"x#{fa}", f"renamed#{fa}")  # a renamed folder
    assert not same_model(f"x#{fa}", f"x#{fb}")  # other weights, same name
    assert same_model("x", f"x#{fa}") and not same_model("y", f"x#{fa}")  # dictionaries saved without a fingerprint
