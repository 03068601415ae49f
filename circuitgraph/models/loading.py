"""Resolve a ``--model`` value to a ``HookedTransformer``.

Accepted values:

* ``default`` — the embedded toy-language model shipped inside the package (works offline);
* a folder saved by :func:`circuitgraph.models.save_model` (``config.json`` of TransformerLens
  fields + ``model.safetensors`` + optional ``tokenizer.json``);
* a local Hugging Face model folder (``config.json`` naming ``architectures`` / ``model_type`` +
  ``model.safetensors`` or sharded safetensors + optional tokenizer files), converted by
  TransformerLens (:mod:`circuitgraph.models.hf_folder`);
* a llama2.c checkpoint ``.bin`` (its tokenizer is found beside it: ``tokenizer.bin`` or
  ``tok{vocab}.bin``, or named explicitly as ``model.bin:tokenizer.bin``);
* a TransformerLens model name such as ``gpt2`` (downloads weights; needs internet).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from transformer_lens import HookedTransformer

from circuitgraph.errors import ModelLoadError
from circuitgraph.models.hf_folder import load_hf_folder, read_hf_config
from circuitgraph.models.llama2c import load_llama2c, read_header
from circuitgraph.models.persistence import CONFIG_FILE, load_model

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(__file__).parent / "default"
"""Where the committed default model lives (written by ``circuitgraph train-toy-model``)."""
DEFAULT_DICTS_DIR = Path(__file__).parent / "default_dicts"
"""The default dictionary set of the default model (``make demo``, ``trace`` without ``--dicts``),
chosen by the ceiling study (``benchmarks/study_ceiling.py``; README "Which dictionaries carry the
behaviour")."""
V1_DICTS_DIR = Path(__file__).parent / "v1_dicts"
"""The first committed set: 16 TopK dictionaries (resid_post, mlp_out, attn_z, transcoder at every
layer, x4, k 16), still loadable with ``--dicts``; the test suite uses it for its every-site-kind mix."""
SPARSE_INTERACTION_DICTS_DIR = Path(__file__).parent / "sparse_interaction_dicts"
"""Committed attention-z + transcoder dictionaries of the default model trained with the
interaction-sparsity penalty (see the README section "Interaction sparsity")."""


def load_default(device: str = "cpu") -> HookedTransformer:
    """The embedded default model: a 4-layer GPT-2-style model trained on the toy language."""
    if not (DEFAULT_MODEL_DIR / CONFIG_FILE).is_file():
        raise ModelLoadError(
            f"the embedded model is missing from {DEFAULT_MODEL_DIR}; "
            "re-create it with `circuitgraph train-toy-model`"
        )
    return load_model(DEFAULT_MODEL_DIR, device=device)


def find_llama2c_tokenizer(model_path: Path) -> Path | None:
    """``tokenizer.bin`` or ``tok{vocab}.bin`` beside a llama2.c checkpoint, if either exists."""
    if not model_path.is_file():
        raise ModelLoadError(f"llama2.c checkpoint {model_path} not found")
    vocab = abs(read_header(model_path).vocab_size)
    for name in ("tokenizer.bin", f"tok{vocab}.bin"):
        if (model_path.parent / name).is_file():
            return model_path.parent / name
    log.warning("no tokenizer beside %s; to_tokens will not work (name one as MODEL.bin:TOKENIZER.bin)", model_path)
    return None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("TRANSFORMERS_OFFLINE", "0") not in ("", "0")


def resolve_model(spec: str, device: str = "cpu") -> HookedTransformer:
    """Load the model named by ``spec`` (see the module docstring for the accepted forms)."""
    if spec == "default":
        return load_default(device)
    path = Path(spec)
    if path.is_dir():
        if read_hf_config(path) is not None:
            return load_hf_folder(path, device=device)
        return load_model(path, device=device)
    model_part, _, tok_part = spec.partition(":")
    if model_part.endswith(".bin") or path.is_file():
        model_path = Path(model_part)
        tokenizer = Path(tok_part) if tok_part else find_llama2c_tokenizer(model_path)
        return load_llama2c(model_path, tokenizer, device=device)
    if _offline():
        raise ModelLoadError(
            f"{spec!r} is neither 'default' nor a model folder, and loading it as a TransformerLens "
            "model name needs the internet but HF_HUB_OFFLINE is set; use --model default or a local folder"
        )
    log.info("loading %s through TransformerLens (downloads weights)", spec)
    try:
        return HookedTransformer.from_pretrained(spec, device=device)
    except Exception as err:  # hub, network and name errors come in many types
        raise ModelLoadError(
            f"could not load {spec!r} as a TransformerLens model ({type(err).__name__}: {err}); "
            "check the name and your internet connection, or pass 'default' or a local folder"
        ) from err
