"""Load a ``tokenizer.json`` (ours, a Hugging Face one, or one rebuilt from llama2.c) for a model.

The tokenizer is used as it is: its own special tokens, its own ids. Nothing is appended, so a
512-token tokenizer stays 512 tokens and can drive a 512-token model. The special tokens come,
in this order, from

1. ``tokenizer_config.json`` / ``special_tokens_map.json`` beside it (a Hugging Face folder); a
   token declared there as ``null`` stays absent;
2. the tokenizer itself: the token its post-processor puts first (BOS), the unknown token of its
   model (UNK), and added special tokens with the usual names (``<|endoftext|>``, ``<s>``,
   ``</s>``, ``<unk>``, ``<pad>``, ...);
3. fallbacks, each logged: BOS is the EOS (GPT-2's convention, which TransformerLens follows);
   padding uses PAD, else EOS, else UNK, else BOS; a tokenizer with neither BOS nor EOS gets its padding
   token (else id 0) as BOS and EOS, so every sequence starts with the same existing token.

A token named in a config but absent from the vocabulary is ignored (with a warning), never added.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import NamedTuple

from tokenizers import Tokenizer
from transformer_lens import HookedTransformer
from transformers import PreTrainedTokenizerFast

from circuitgraph.errors import CircuitGraphError, ModelLoadError

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
_ROLES = ("bos", "eos", "unk", "pad")
_NAMES: dict[str, tuple[str, ...]] = {
    "bos": ("<|endoftext|>", "<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "[BOS]", "<|bos|>"),
    "eos": ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[EOS]", "<|eos|>"),
    "unk": ("<unk>", "[UNK]", "<|unk|>"),
    "pad": ("<pad>", "[PAD]", "<|pad|>", "<|padding|>"),
}
"""Usual spellings of each special token (compared after stripping surrounding whitespace)."""


class SpecialTokens(NamedTuple):
    """The special tokens of a tokenizer, as strings of its vocabulary (None: it has none)."""

    bos: str | None
    eos: str | None
    unk: str | None
    pad: str | None


def _declared(folder: Path) -> dict[str, str | None]:
    """Special tokens declared in ``tokenizer_config.json`` / ``special_tokens_map.json`` (a key
    present with ``null`` means "none"); the first file wins."""
    out: dict[str, str | None] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ModelLoadError(f"{path} is not valid JSON ({err}); fix or delete it") from err
        for role in _ROLES:
            key = f"{role}_token"
            if key in data and role not in out:
                value = data[key]
                out[role] = value.get("content") if isinstance(value, dict) else value
    return out


def _detected(tok: Tokenizer) -> dict[str, str]:
    """Special tokens read off the tokenizer: its post-processor's first token, its model's
    unknown token, and added special tokens (then plain vocabulary entries) with the usual names."""
    spec = json.loads(tok.to_str())
    found: dict[str, str] = {}
    post = spec.get("post_processor") or {}
    single = post.get("single") if post.get("type") == "TemplateProcessing" else None
    if single and "SpecialToken" in single[0]:
        found["bos"] = single[0]["SpecialToken"]["id"]
    model = spec.get("model") or {}
    if isinstance(model.get("unk_token"), str):
        found["unk"] = model["unk_token"]
    elif isinstance(model.get("unk_id"), int):  # Unigram
        found["unk"] = tok.id_to_token(model["unk_id"])
    added = [t["content"] for t in spec.get("added_tokens", []) if t.get("special")]
    for role, names in _NAMES.items():
        if role in found:
            continue
        match = next((t for t in added if t.strip() in names), None)
        if match is None:
            match = next((n for n in names if tok.token_to_id(n) is not None), None)
        if match is not None:
            found[role] = match
    return found


def special_tokens(tok: Tokenizer, folder: Path | None = None) -> SpecialTokens:
    """The special tokens of ``tok`` (declared in ``folder``'s configs, else detected, else the
    module docstring's fallbacks); every one is a token of ``tok``'s vocabulary."""
    declared = _declared(folder) if folder is not None else {}
    detected = _detected(tok)
    roles: dict[str, str | None] = {}
    for role in _ROLES:
        value = declared[role] if role in declared else detected.get(role)
        if value is not None and tok.token_to_id(value) is None:
            log.warning("the tokenizer's %s token %r is not in its vocabulary; ignored", role.upper(), value)
            value = None
        roles[role] = value
    if roles["bos"] is None and roles["eos"] is not None:
        log.info("the tokenizer has no BOS token; its EOS %r starts each prompt (GPT-2's convention)", roles["eos"])
        roles["bos"] = roles["eos"]
    if roles["pad"] is None:  # masked out wherever it pads; without one TransformerLens adds a token
        roles["pad"] = roles["eos"] or roles["unk"] or roles["bos"]
    if roles["bos"] is None:
        start = roles["pad"] or tok.id_to_token(0)
        log.warning("the tokenizer declares no BOS or EOS token; %r (id %d) starts each prompt and each training "
                    "sequence. Declare bos_token in a tokenizer_config.json beside tokenizer.json if the model "
                    "expects another start", start, tok.token_to_id(start))
        roles["bos"] = roles["eos"] = start
        roles["pad"] = roles["pad"] or start
    return SpecialTokens(**roles)


def load_tokenizer(path: str | Path, d_vocab: int | None = None) -> PreTrainedTokenizerFast:
    """Load ``tokenizer.json`` (a file, or a folder holding one) for TransformerLens, with its own
    special tokens (see the module docstring) and no new ids.

    Args:
        path: the ``tokenizer.json`` file or its folder.
        d_vocab: the model's vocabulary size; a tokenizer with ids at or beyond it is refused.

    Raises:
        ModelLoadError: the file is missing or malformed, or its vocabulary is larger than ``d_vocab``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise ModelLoadError(f"tokenizer file {path} does not exist; expected a {TOKENIZER_FILE}")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
        raise ModelLoadError(f"{path} is not a valid {TOKENIZER_FILE} ({err}); re-create it") from err
    n_ids = max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
    if d_vocab is not None and n_ids > d_vocab:
        raise ModelLoadError(
            f"{path} has {n_ids} token ids but the model's vocabulary has {d_vocab}: the tokenizer belongs to "
            "another model. Put the tokenizer the model was trained with beside it"
        )
    sp = special_tokens(tok, path.parent)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=sp.bos, eos_token=sp.eos, unk_token=sp.unk, pad_token=sp.pad,
        add_bos_token=True, padding_side="right", name_or_path=str(path.parent),
    )
    if len(wrapped) != n_ids:  # every special token above is in the vocabulary, so this cannot grow
        raise ModelLoadError(f"wrapping {path} changed its vocabulary from {n_ids} to {len(wrapped)} ids")
    log.debug("tokenizer %s: %d ids, special tokens %s", path, n_ids, sp)
    return wrapped


def require_tokenizer(model: HookedTransformer, what: str, token_ids: str) -> None:
    """Refuse text input to a model without a tokenizer, naming both fixes.

    Args:
        model: the model the text is for.
        what: the input that is text (e.g. ``"--prompt"``).
        token_ids: how to give the same input as token ids instead.

    Raises:
        CircuitGraphError: ``model`` has no tokenizer.
    """
    if model.tokenizer is None:
        raise CircuitGraphError(
            f"{what} is text, and this model has no tokenizer to turn it into token ids; put the model's "
            f"{TOKENIZER_FILE} in its folder (Hugging Face folders: save it there with "
            f"AutoTokenizer.from_pretrained(...).save_pretrained(folder)), or give token ids instead: {token_ids}"
        )
