"""Models: the embedded default, saved folders, Hugging Face folders, llama2.c checkpoints and
TransformerLens names behind one ``--model`` flag (docs/models.md)."""

from circuitgraph.models.hf_folder import load_hf_folder
from circuitgraph.models.llama2c import load_llama2c
from circuitgraph.models.loading import DEFAULT_MODEL_DIR, load_default, resolve_model
from circuitgraph.models.persistence import load_model, save_model

__all__ = ["DEFAULT_MODEL_DIR", "load_default", "load_hf_folder", "load_llama2c", "load_model", "resolve_model", "save_model"]
