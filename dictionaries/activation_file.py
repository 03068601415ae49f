"""Train a dictionary on a user's own activations, no model needed (``train-dictionaries --activations``).

The file is safetensors with

* ``activations`` ``[n, d_in]``: what the dictionary reads, one row per token;
* ``targets`` ``[n, d_out]``: what it reconstructs, for a ``transcoder`` site only (an
  autoencoder site reconstructs ``activations`` and takes no ``targets``);

and optional string metadata ``site`` (the site id the dictionary is for, e.g. ``L3.resid_post``:
its folder name and where a model run will splice it; a flag may give it instead) and
``model_name``. Any floating dtype; rows are read as float32, all into memory.

Training is the model-driven loop itself (:func:`dictionaries.training.run_training`) fed by
:class:`TensorBatches`: each epoch walks the rows in a fresh permutation seeded by ``(seed,
epoch)``, ``batch_tokens`` rows a step, so step ``s`` always sees the same rows and a resumed
run ends with the weights of an uninterrupted one. ``tokens`` counts rows: more tokens than rows
means several epochs. Terms that need the model (interaction penalty, end-to-end KL) are refused.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open

from dictionaries.architectures.registry import build_dictionary
from dictionaries.determinism import deterministic
from dictionaries.errors import DictionaryError
from dictionaries.site import Site
from dictionaries.training import TrainConfig, TrainResult, run_training

log = logging.getLogger(__name__)
INPUTS, TARGETS = "activations", "targets"


class ActivationFile(NamedTuple):
    """A user's activations, checked."""

    inputs: torch.Tensor
    """``[n, d_in]`` float32 rows the dictionary reads."""
    targets: torch.Tensor | None
    """``[n, d_out]`` float32 rows a transcoder reconstructs; ``None`` for an autoencoder."""
    site: Site
    """The site the dictionary is trained for."""
    model_name: str
    """The model the activations came from (``""`` if the file does not say)."""
    data_id: str
    """Identifies the data in checkpoints (shapes and sums), so a resume on other data is refused."""


def read_activation_file(path: str | Path, site: str = "") -> ActivationFile:
    """Read and check an activation file; ``site`` (a site id) overrides the file's ``site`` metadata."""
    path = Path(path)
    if not path.is_file():
        raise DictionaryError(f"activation file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise DictionaryError(f"{path} is not a readable safetensors file ({err}); save the activations with "
                              "safetensors.torch.save_file({'activations': x}, path)") from err
    unknown = sorted(set(tensors) - {INPUTS, TARGETS})
    if INPUTS not in tensors or unknown:
        raise DictionaryError(f"{path} holds tensors {sorted(tensors)}; expected '{INPUTS}' [n, d_in] and, for a "
                              f"transcoder, '{TARGETS}' [n, d_out], nothing else")
    for key, t in tensors.items():
        if t.ndim != 2 or not t.is_floating_point() or t.shape[0] == 0 or t.shape[1] == 0:
            raise DictionaryError(f"{path}: '{key}' is {t.dtype} of shape {tuple(t.shape)}; it must be a non-empty "
                                  "2-D float tensor [tokens, width] (flatten batch and position first)")
    x, y = tensors[INPUTS].float(), tensors.get(TARGETS)
    y = None if y is None else y.float()
    if y is not None and y.shape[0] != x.shape[0]:
        raise DictionaryError(f"{path}: '{INPUTS}' has {x.shape[0]} rows but '{TARGETS}' has {y.shape[0]}; "
                              "row i of both must be the same token")
    for key, t in ((INPUTS, x), (TARGETS, y)):
        if t is not None and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).any(1).sum())
            raise DictionaryError(f"{path}: '{key}' holds NaN or inf in {bad} rows; drop or fix those tokens")
    site_id = site or meta.get("site", "")
    if not site_id:
        raise DictionaryError(f"{path} does not say which site the activations are from; pass --site (e.g. "
                              "L3.resid_post, or L3.transcoder with targets) or store metadata {'site': ...} in the file")
    try:
        s = Site.parse(site_id)
    except ValueError as err:
        raise DictionaryError(f"site {site_id!r}: {err}") from err
    if s.is_cross_layer:
        raise DictionaryError(f"{s.id}: a cross-layer transcoder trains jointly over every later layer's output; "
                              "train it from a model (--sites clt)")
    if s.is_transcoder and y is None:
        raise DictionaryError(f"{s.id} is a transcoder site: the file needs '{TARGETS}' [n, d_out] (the MLP outputs) "
                              f"beside '{INPUTS}' (the MLP inputs)")
    if not s.is_transcoder and y is not None:
        raise DictionaryError(f"{s.id} reconstructs its own input, but the file holds '{TARGETS}'; drop them, or "
                              "name a transcoder site (e.g. L3.transcoder)")
    data_id = f"{path.name}:{tuple(x.shape)}:{float(x.double().sum()):.17g}" + (
        "" if y is None else f":{tuple(y.shape)}:{float(y.double().sum()):.17g}")
    return ActivationFile(x, y, s, str(meta.get("model_name", "")), data_id)


class TensorBatches:
    """``batches(start_step)`` over an :class:`ActivationFile`: seeded per-epoch permutations."""

    def __init__(self, acts: ActivationFile, batch_tokens: int, seed: int, device: str = "cpu") -> None:
        self.acts, self.batch_tokens, self.seed, self.device = acts, batch_tokens, seed, device
        self.per_epoch = acts.inputs.shape[0] // batch_tokens
        if self.per_epoch == 0:
            raise DictionaryError(f"the activation file holds {acts.inputs.shape[0]} rows, fewer than one batch of "
                                  f"{batch_tokens}; lower --batch-tokens or give more rows")

    def __call__(self, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Endless ``{input hook: [batch_tokens, d_in], output hook: [batch_tokens, d_out]}``; the first is step ``start_step``'s."""
        site, bt, step = self.acts.site, self.batch_tokens, start_step
        while True:
            epoch, i = divmod(step, self.per_epoch)
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            rows = torch.randperm(self.acts.inputs.shape[0], generator=gen)[i * bt:(i + 1) * bt]
            x = self.acts.inputs[rows].to(self.device)
            y = x if self.acts.targets is None else self.acts.targets[rows].to(self.device)
            yield {site.input_hook: x, site.output_hook: y}
            step += 1


@deterministic()
def train_on_activations(acts: ActivationFile, cfg: TrainConfig, out_dir: str | Path,
                         checkpoint: str | Path | None = None, device: str = "cpu") -> TrainResult:
    """Train one dictionary of ``cfg`` on ``acts`` with the shared loop; save it to ``out_dir/<site id>/``."""
    needs_model = [name for name, on in (("interaction_penalty", cfg.interaction.penalty > 0),
                                         ("e2e_kl_coeff", cfg.e2e.kl_coeff > 0),
                                         ("activation_cache", cfg.store.activation_cache)) if on]
    if needs_model:
        raise DictionaryError(f"{', '.join(needs_model)} need(s) the model; an activation file trains without one, "
                              "so leave them at their defaults")
    d_in = acts.inputs.shape[1]
    d_out = d_in if acts.targets is None else acts.targets.shape[1]
    try:
        dcfg = cfg.dictionary_config(acts.site, d_in, d_out, acts.model_name)
    except ValueError as err:
        raise DictionaryError(f"{acts.site.id}: {err}") from err
    batches = TensorBatches(acts, cfg.store.batch_tokens, cfg.seed, device)
    epochs = cfg.steps / batches.per_epoch
    log.info("training %s on %d rows (%d -> %d) for %d steps, %.2f epochs", acts.site.id, acts.inputs.shape[0],
             d_in, d_out, cfg.steps, epochs)
    d = build_dictionary(dcfg, seed=cfg.seed * 7919).to(device)
    return run_training({acts.site: d}, batches, cfg, out_dir, checkpoint, data_id=acts.data_id)
