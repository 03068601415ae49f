"""The activation store: one model forward per batch of sequences feeds every dictionary.

Activations of every requested hook (all layers, all site kinds) are captured in a single
forward pass (stopped after the last needed layer), flattened to one row per token (BOS dropped:
its activations are outliers no dictionary should spend capacity on) and shuffled within a
chunk. Chunk ``c`` always holds the same sequences and the same shuffle (seeded by ``(seed, c)``),
so training step ``s`` always sees the same batch: runs are deterministic and resume exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformer_lens import HookedTransformer

from dictionaries.atomic import atomic_save_file
from dictionaries.token_sources import TokenSource


@dataclass(frozen=True)
class StoreConfig:
    """How activations are gathered and batched (``TrainConfig.store``; the shuffle seed is the run's)."""

    batch_tokens: int = 4096
    """Tokens (rows) per training batch (one optimizer step)."""
    chunk_sequences: int = 256
    """Sequences per shuffled activation chunk; a chunk holds chunk_sequences * (seq_len - 1) tokens."""
    model_batch: int = 64
    """Sequences per model forward pass."""
    activation_cache: str = ""
    """Folder for an on-disk activation cache: each chunk's activations are saved there as a
    safetensors shard on first use and read back afterwards (a second or resumed run skips the
    model); empty disables it."""

    def __post_init__(self) -> None:
        for name in ("batch_tokens", "chunk_sequences", "model_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")


def _layer_of(hook: str) -> int:
    return int(hook.split(".")[1]) if hook.startswith("blocks.") else 10**9


class ActivationStore:
    """Serves ``{hook: [batch_tokens, d]}`` batches for a fixed set of hooks."""

    def __init__(self, model: HookedTransformer, hooks: Sequence[str], source: TokenSource,
                 cfg: StoreConfig = StoreConfig(), seed: int = 0) -> None:
        valid = set(model.hook_dict)
        unknown = [h for h in hooks if h not in valid]
        if unknown:
            raise ValueError(f"hooks {unknown} do not exist in this model; valid hooks look like {sorted(valid)[:3]}")
        self.model, self.hooks, self.source, self.cfg, self.seed = model, sorted(set(hooks)), source, cfg, seed
        self.stop_at = max(_layer_of(h) for h in self.hooks) + 1
        if self.stop_at > model.cfg.n_layers:
            self.stop_at = None
        tokens_per_chunk = cfg.chunk_sequences * (source.seq_len - 1)
        if tokens_per_chunk < cfg.batch_tokens:
            raise ValueError(
                f"a chunk holds {tokens_per_chunk} tokens, fewer than one batch of {cfg.batch_tokens}; "
                "raise chunk_sequences or lower batch_tokens"
            )
        self.batches_per_chunk = tokens_per_chunk // cfg.batch_tokens

    @torch.no_grad()
    def activations(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{hook: [n_seq * (seq_len - 1), d]}`` for ``[n_seq, seq_len]`` tokens (BOS dropped)."""
        captured: dict[str, torch.Tensor] = {}

        def save(act: torch.Tensor, hook) -> None:
            captured[hook.name] = act[:, 1:].reshape(act.shape[0] * (act.shape[1] - 1), -1).float()

        device = self.model.cfg.device
        with self.model.hooks(fwd_hooks=[(h, save) for h in self.hooks]):
            self.model(tokens.to(device), stop_at_layer=self.stop_at)
        return captured

    def _shard_meta(self, index: int) -> dict[str, str]:
        return {"hooks": ",".join(self.hooks), "chunk": str(index), "seed": str(self.seed),
                "chunk_sequences": str(self.cfg.chunk_sequences), "seq_len": str(self.source.seq_len)}

    def chunk(self, index: int) -> dict[str, torch.Tensor]:
        """All (shuffled) activations of chunk ``index`` (from the on-disk cache when present)."""
        if not self.cfg.activation_cache:
            return self._compute_chunk(index)
        path = Path(self.cfg.activation_cache) / f"chunk_{index:06d}.safetensors"
        if path.is_file():
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata() or {}
                    if meta == self._shard_meta(index):
                        return {h: f.get_tensor(h) for h in self.hooks}
            except (SafetensorError, OSError):
                pass  # a torn or foreign shard is recomputed and overwritten
        acts = self._compute_chunk(index)
        atomic_save_file({h: a.contiguous().cpu() for h, a in acts.items()}, path, metadata=self._shard_meta(index))
        return acts

    def _compute_chunk(self, index: int) -> dict[str, torch.Tensor]:
        cs, mb = self.cfg.chunk_sequences, self.cfg.model_batch
        parts: dict[str, list[torch.Tensor]] = {h: [] for h in self.hooks}
        for start in range(0, cs, mb):
            toks = self.source.sequences(index * cs + start, min(mb, cs - start))
            for hook, act in self.activations(toks).items():
                parts[hook].append(act)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        acts = {h: torch.cat(p) for h, p in parts.items()}
        perm = torch.randperm(next(iter(acts.values())).shape[0], generator=gen)
        return {h: a[perm.to(a.device)] for h, a in acts.items()}

    def batches(self, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Endless batches; the first is training step ``start_step``'s."""
        step = start_step
        while True:
            c, offset = divmod(step, self.batches_per_chunk)
            acts = self.chunk(c)
            bt = self.cfg.batch_tokens
            for i in range(offset, self.batches_per_chunk):
                yield {h: a[i * bt : (i + 1) * bt] for h, a in acts.items()}
                step += 1
