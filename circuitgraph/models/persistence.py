"""Save and load a ``HookedTransformer`` as a folder: ``config.json`` + ``model.safetensors`` + ``tokenizer.json``.

Only architecture fields are stored (an explicit list, so the files stay readable and stable
across TransformerLens versions); weights go through safetensors, never pickle.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

from circuitgraph.errors import ModelLoadError
from circuitgraph.models.tokenizer_files import TOKENIZER_FILE, load_tokenizer

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

ARCH_KEYS: tuple[str, ...] = (
    "n_layers", "d_model", "n_ctx", "d_head", "n_heads", "d_mlp", "d_vocab", "d_vocab_out",
    "act_fn", "normalization_type", "positional_embedding_type", "n_key_value_heads", "gated_mlp",
    "final_rms", "eps", "rotary_dim", "rotary_base", "rotary_adjacent_pairs", "attn_only",
    "original_architecture", "default_prepend_bos", "model_name", "use_attn_scale",
    "parallel_attn_mlp", "use_local_attn", "window_size", "attn_types", "use_qk_norm",
    "scale_attn_by_inverse_layer_idx", "use_NTK_by_parts_rope", "NTK_by_parts_low_freq_factor",
    "NTK_by_parts_high_freq_factor", "NTK_by_parts_factor", "NTK_original_ctx_len", "attention_dir",
)


def config_to_dict(cfg: HookedTransformerConfig) -> dict:
    """The architecture fields of a config, JSON-serialisable."""
    full = cfg.to_dict()
    return {k: full[k] for k in ARCH_KEYS if k in full}


def config_from_dict(data: dict, device: str = "cpu") -> HookedTransformerConfig:
    """Build a config from :func:`config_to_dict` output, ignoring fields this TransformerLens lacks."""
    known = {f.name for f in dataclasses.fields(HookedTransformerConfig)}
    missing = {"n_layers", "d_model", "n_ctx", "d_head"} - data.keys()
    if missing:
        raise ModelLoadError(f"model config lacks required fields {sorted(missing)}")
    kwargs = {k: v for k, v in data.items() if k in known}
    return HookedTransformerConfig(**kwargs, device=device)


def save_model(model: HookedTransformer, folder: str | Path) -> Path:
    """Write ``model`` (config, weights, tokenizer if it has one) into ``folder``; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(config_to_dict(model.cfg), indent=2) + "\n")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    if model.tokenizer is not None:
        model.tokenizer.backend_tokenizer.save(str(folder / TOKENIZER_FILE))
    return folder


def load_model(folder: str | Path, device: str = "cpu") -> HookedTransformer:
    """Load a model saved by :func:`save_model`.

    Raises:
        ModelLoadError: the folder or one of its files is missing, corrupt, or does not match.
    """
    folder = Path(folder)
    cfg_path, w_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (cfg_path, w_path):
        if not path.is_file():
            raise ModelLoadError(
                f"{path} not found: a saved model folder needs {CONFIG_FILE} and {WEIGHTS_FILE}"
            )
    try:
        data = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{cfg_path} is not valid JSON ({err}); re-save the model") from err
    if "architectures" in data or "model_type" in data:
        raise ModelLoadError(f"{folder} is a Hugging Face model folder; load it with resolve_model (--model {folder}) "
                             "or load_hf_folder")
    cfg = config_from_dict(data, device=device)
    if (folder / TOKENIZER_FILE).is_file():
        tokenizer = load_tokenizer(folder / TOKENIZER_FILE, d_vocab=cfg.d_vocab)
    else:
        tokenizer = None
        log.info("%s has no %s: the model takes token ids only (no text prompts)", folder, TOKENIZER_FILE)
    try:
        state = load_file(str(w_path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise ModelLoadError(f"{w_path} is corrupt or truncated ({err}); re-save the model") from err
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    expected = model.state_dict()
    # causal masks and IGNORE constants are rebuilt from the config (their layout differs between
    # TransformerLens versions), so saved copies are never loaded
    state = {k: v for k, v in state.items() if not k.endswith(("IGNORE", "mask"))}
    mismatched = [
        k for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    absent = [k for k in expected if k not in state and not k.endswith(("IGNORE", "mask"))]
    unused = [k for k in state if k not in expected]  # e.g. q/k norms of a config that lost use_qk_norm
    if mismatched or absent or unused:
        raise ModelLoadError(
            f"{w_path} does not match {cfg_path}: shape mismatch in {mismatched[:5]}, "
            f"missing {absent[:5]}, not used by the config {unused[:5]}; the two files come from different models"
        )
    model.load_state_dict(state, strict=False)
    if str(device) != "cpu":
        model.to(device)
    model.eval()
    log.debug("loaded model from %s (%d layers)", folder, cfg.n_layers)
    return model

