"""Load a local Hugging Face model folder as a ``HookedTransformer``, converted by TransformerLens.

A Hugging Face folder is recognised by its ``config.json`` naming ``architectures`` or
``model_type`` (our own saved folders store TransformerLens fields instead). Loading:

1. refuse an architecture outside :data:`SUPPORTED_ARCHITECTURES`, and a folder whose weights
   are only pickles (``pytorch_model.bin``): weights are read from safetensors only;
2. load the model with ``transformers`` from the folder (float32, no network, no remote code);
3. map its config with TransformerLens's own ``get_pretrained_model_config`` (run on a copy of
   ``config.json`` in a fresh temporary folder, because TransformerLens picks some architectures
   from the *path's* spelling, e.g. any path containing "llama") and convert its weights with
   TransformerLens's own converter for the architecture (``get_pretrained_state_dict``);
4. load them unprocessed (no layer-norm folding, no centring), so the logits are the model's own;
5. check that the converted model's logits equal the Hugging Face model's on a short random
   sequence, and refuse the folder if they do not (a config feature TransformerLens does not map);
6. attach the folder's ``tokenizer.json`` (see :mod:`circuitgraph.models.tokenizer_files`), if any.

The context is capped at :data:`MAX_CTX` (TransformerLens builds an ``n_ctx x n_ctx`` mask per
layer); the cap is logged.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens import loading_from_pretrained as tl_loading

from circuitgraph.errors import ModelLoadError
from circuitgraph.models.tokenizer_files import TOKENIZER_FILE, load_tokenizer
from dictionaries.model_identity import with_fingerprint

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "GPT2LMHeadModel", "GPTNeoForCausalLM", "GPTNeoXForCausalLM", "LlamaForCausalLM", "MistralForCausalLM",
    "OPTForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
)
"""Architectures whose TransformerLens conversion of a local folder is checked by the test suite
(logits equal to the Hugging Face model's)."""
MAX_CTX = 2048
"""Largest context a converted model gets (longer ones are capped, as TransformerLens does for its
own large models)."""
VERIFY_TOKENS = 32
"""Length of the random sequence on which converted and original logits are compared."""
VERIFY_RTOL = 1e-3
"""Largest logit difference accepted, relative to the largest logit (at least 1)."""
_NAME_TRIGGERS = ("llama", "gemma", "wav2vec2", "santacoder", "tinystories")
"""Substrings by which TransformerLens recognises a model from its name instead of its config."""


def read_hf_config(folder: Path) -> dict | None:
    """``folder``'s ``config.json`` if it is a Hugging Face one (names ``architectures`` or
    ``model_type``), else None."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{path} is not valid JSON ({err}); fix or re-save the model") from err
    return data if isinstance(data, dict) and ("architectures" in data or "model_type" in data) else None


def hf_architecture(config: dict, folder: Path) -> str:
    """The causal-LM class named by a Hugging Face config; refuses unsupported ones."""
    archs = config.get("architectures") or []
    if archs:
        arch = archs[0]
    else:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type"), f"model_type {config.get('model_type')!r}")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{folder} holds a {arch}, which circuitgraph cannot convert to TransformerLens; supported "
            f"architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def _check_weights(folder: Path) -> None:
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        return
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
    if pickles:
        raise ModelLoadError(
            f"{folder} holds its weights only as {', '.join(pickles[:3])} (Python pickles, which can run code "
            "when loaded); circuitgraph reads safetensors only. Convert it once, somewhere you trust the file: "
            f"AutoModelForCausalLM.from_pretrained({str(folder)!r}).save_pretrained({str(folder)!r}) "
            "writes model.safetensors"
        )
    raise ModelLoadError(f"{folder} has config.json but no model.safetensors (or model.safetensors.index.json with "
                         "its shards); add the weights")


def _tl_config(folder: Path, arch: str, hf_model: torch.nn.Module) -> HookedTransformerConfig:
    """TransformerLens's config for the folder's model, mapped by its own code (see step 3)."""
    data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    data["architectures"] = [arch]  # a config naming only model_type: TransformerLens reads architectures[0]
    if arch == "GPT2LMHeadModel" and "n_ctx" not in data:  # TransformerLens reads n_ctx, which transformers 5 no longer writes
        data["n_ctx"] = data.get("n_positions", 1024)
    hf_ctx = int(data.get("max_position_embeddings") or data.get("n_positions") or data.get("n_ctx") or MAX_CTX)
    if hf_ctx > MAX_CTX:
        log.info("%s: context %d capped at %d", folder, hf_ctx, MAX_CTX)
    with tempfile.TemporaryDirectory(prefix="circuitgraph-config-") as tmp:
        if any(t in tmp.lower() for t in _NAME_TRIGGERS):
            raise ModelLoadError(f"the temporary folder {tmp} contains a model name TransformerLens reacts to; "
                                 "set TMPDIR to another folder")
        (Path(tmp) / "config.json").write_text(json.dumps(data), encoding="utf-8")
        try:
            cfg = tl_loading.get_pretrained_model_config(
                tmp, hf_cfg=hf_model.config.to_dict(), fold_ln=False, device="cpu", dtype=torch.float32,
                n_ctx=min(hf_ctx, MAX_CTX),
            )
        except Exception as err:  # TransformerLens raises many types on configs it cannot map
            raise ModelLoadError(f"TransformerLens could not map the {arch} config of {folder} "
                                 f"({type(err).__name__}: {err})") from err
    cfg.tokenizer_name = None  # the tokenizer comes from the folder, never from the hub
    cfg.model_name = folder.resolve().name  # load_hf_folder appends the weights' fingerprint
    return cfg


def _verify(model: HookedTransformer, hf_model: torch.nn.Module, folder: Path) -> float:
    """Max |logit difference| between the converted and the original model; refuses a mismatch."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.cfg.d_vocab, (1, min(VERIFY_TOKENS, model.cfg.n_ctx)), generator=g)
    with torch.no_grad():
        ours, ref = model(tokens), hf_model(tokens).logits
    diff = (ours - ref).abs().max().item()
    if not diff <= VERIFY_RTOL * max(1.0, ref.abs().max().item()):
        raise ModelLoadError(
            f"TransformerLens's conversion of {folder} does not reproduce its logits (max difference {diff:.3g}); "
            "its config uses a feature TransformerLens does not map for this architecture"
        )
    return diff


def load_hf_folder(folder: str | Path, device: str = "cpu") -> HookedTransformer:
    """A local Hugging Face model folder as an unprocessed ``HookedTransformer`` (see the module docstring).

    Raises:
        ModelLoadError: not a supported Hugging Face folder, pickled weights only, files that do not
            load, or a conversion that does not reproduce the model's logits.
    """
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    config = read_hf_config(folder)
    if config is None:
        raise ModelLoadError(f"{folder} has no Hugging Face config.json (one naming architectures or model_type)")
    arch = hf_architecture(config, folder)
    _check_weights(folder)
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, use_safetensors=True, local_files_only=True, trust_remote_code=False
        ).eval()
    except Exception as err:  # transformers raises OSError, ValueError, safetensors and shape errors
        raise ModelLoadError(f"transformers could not load {folder} ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}); check its files") from err
    cfg = _tl_config(folder, arch, hf_model)
    try:
        state = tl_loading.get_pretrained_state_dict(str(folder.resolve()), cfg, hf_model=hf_model, dtype=torch.float32)
    except Exception as err:  # quantised weights, missing modules: TransformerLens raises many types
        raise ModelLoadError(f"TransformerLens could not convert the {arch} weights of {folder} "
                             f"({type(err).__name__}: {err})") from err
    if "pos_embed.W_pos" in state:  # learned positions beyond the (capped) context are dropped
        state["pos_embed.W_pos"] = state["pos_embed.W_pos"][: cfg.n_ctx]
    tokenizer = None
    if (folder / TOKENIZER_FILE).is_file():
        tokenizer = load_tokenizer(folder / TOKENIZER_FILE, d_vocab=cfg.d_vocab)
    else:
        log.warning("%s has no %s: the model takes token ids only (save its tokenizer there with "
                    "AutoTokenizer.from_pretrained(...).save_pretrained(folder) to use text)", folder, TOKENIZER_FILE)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    try:
        model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                          fold_value_biases=False, refactor_factored_attn_matrices=False)
    except RuntimeError as err:  # shape mismatch: a config field the mapping ignores
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if ln.startswith(("size mismatch", "Missing", "Unexpected"))), lines[0])
        raise ModelLoadError(f"TransformerLens's {arch} weights do not fit its config for {folder} ({detail}); "
                             f"this variant of {arch} is not supported") from err
    model.eval()
    model.cfg.model_name = with_fingerprint(cfg.model_name, model)  # renaming the folder keeps its dictionaries
    diff = _verify(model, hf_model, folder)
    log.info("loaded %s (%s, %d layers) via TransformerLens; logits match transformers to %.2g", folder, arch,
             cfg.n_layers, diff)
    del hf_model
    if str(device) != "cpu":
        model.to(device)
    return model
