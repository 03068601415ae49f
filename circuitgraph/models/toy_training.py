"""Train the embedded default model: a GPT-2-style ``HookedTransformer`` on the toy-language corpus.

The recipe (AdamW, linear warm-up then cosine decay, deterministic data by document index) runs
in about a quarter of an hour on 2 CPU cores. It checkpoints atomically every
``checkpoint_every`` steps and resumes exactly: a killed and resumed run ends with the same
weights as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer, HookedTransformerConfig

from circuitgraph.models.persistence import save_model
from circuitgraph.toylang.corpus import CorpusConfig, ToyCorpus
from circuitgraph.toylang.tokenizer import wrap_tokenizer
from dictionaries.checkpoint import (
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    save_checkpoint,
)
from dictionaries.determinism import deterministic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToyModelConfig:
    """Architecture of the embedded model (GPT-2 style: LayerNorm, GELU, learned positions)."""

    n_layers: int = 4
    """Transformer blocks."""
    d_model: int = 128
    """Residual stream width."""
    n_heads: int = 4
    """Attention heads per layer (d_head = d_model / n_heads)."""
    d_mlp: int = 512
    """MLP hidden width."""
    n_ctx: int = 128
    """Context length."""

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")


@dataclass(frozen=True)
class ToyTrainConfig:
    """Optimisation settings for :func:`train_toy_model`."""

    steps: int = 2400
    """Optimizer steps."""
    batch_size: int = 32
    """Sequences per step."""
    lr: float = 2e-3
    """Peak learning rate."""
    warmup: int = 100
    """Linear warm-up steps."""
    weight_decay: float = 0.05
    """AdamW weight decay."""
    seed: int = 0
    """Seed for weights and data."""
    checkpoint_every: int = 200
    """Steps between atomic checkpoints."""

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError("steps and batch_size must be positive")
        if self.checkpoint_every < 1 or self.warmup < 0:
            raise ValueError(f"checkpoint_every must be at least 1 and warmup >= 0 (got {self.checkpoint_every}, "
                             f"{self.warmup})")
        if not (math.isfinite(self.lr) and self.lr > 0 and math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"lr must be a positive finite number and weight_decay finite and >= 0 (got {self.lr}, "
                             f"{self.weight_decay})")


def build_untrained(model_cfg: ToyModelConfig, seed: int) -> HookedTransformer:
    """A freshly initialised model with the toy tokenizer attached."""
    corpus = ToyCorpus(CorpusConfig(seed=seed, seq_len=model_cfg.n_ctx))
    cfg = HookedTransformerConfig(
        n_layers=model_cfg.n_layers,
        d_model=model_cfg.d_model,
        n_ctx=model_cfg.n_ctx,
        d_head=model_cfg.d_model // model_cfg.n_heads,
        n_heads=model_cfg.n_heads,
        d_mlp=model_cfg.d_mlp,
        d_vocab=corpus.tokenizer.get_vocab_size(),
        act_fn="gelu",
        normalization_type="LN",
        positional_embedding_type="standard",
        model_name="circuitgraph-toy",
        seed=seed,
    )
    return HookedTransformer(cfg, tokenizer=wrap_tokenizer(corpus.tokenizer))


def _lr_factor(step: int, cfg: ToyTrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


@deterministic()
def train_toy_model(
    out_dir: str | Path,
    model_cfg: ToyModelConfig = ToyModelConfig(),
    train_cfg: ToyTrainConfig = ToyTrainConfig(),
    checkpoint: str | Path | None = None,
) -> HookedTransformer:
    """Train the default model and save it to ``out_dir`` (config, weights, tokenizer).

    ``checkpoint`` (default ``out_dir/train_checkpoint.safetensors``) is resumed from when present.
    """
    out_dir = Path(out_dir)
    ckpt_path = Path(checkpoint) if checkpoint else out_dir / "train_checkpoint.safetensors"
    model = build_untrained(model_cfg, train_cfg.seed)
    corpus = ToyCorpus(CorpusConfig(seed=train_cfg.seed, seq_len=model_cfg.n_ctx))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "W_pos" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "W_pos" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train_cfg.lr, betas=(0.9, 0.98),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, train_cfg))
    start = 0
    if ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path)
        if ck.meta.get("model_cfg") != asdict(model_cfg) or ck.meta.get("train_cfg") != asdict(train_cfg):
            raise ValueError(f"{ckpt_path} was written with other settings; delete it or use the same flags")
        model.load_state_dict({k[6:]: v for k, v in ck.tensors.items() if k.startswith("model.")})
        optimizer_from_flat(opt, ck.tensors, ck.meta["optim"])
        start = ck.meta["step"]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, train_cfg), last_epoch=start - 1)
        log.info("resumed from %s at step %d", ckpt_path, start)
    model.train()
    batches = corpus.batches(train_cfg.batch_size, start=start * train_cfg.batch_size)
    bar = tqdm(range(start, train_cfg.steps), desc="train toy model", initial=start, total=train_cfg.steps)
    t0 = time.time()
    for step in bar:
        tokens = next(batches)
        loss = model(tokens, return_type="loss")
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; last checkpoint {ckpt_path} is intact")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        done = step + 1
        if done % train_cfg.checkpoint_every == 0 and done < train_cfg.steps:
            tensors, optim_meta = optimizer_to_flat(opt)
            tensors.update({f"model.{k}": v for k, v in model.state_dict().items()})
            meta = {"step": done, "model_cfg": asdict(model_cfg), "train_cfg": asdict(train_cfg), "optim": optim_meta}
            save_checkpoint(ckpt_path, tensors, meta)
    log.info("trained %d steps in %.0f s", train_cfg.steps - start, time.time() - t0)
    model.eval()
    save_model(model, out_dir)
    if ckpt_path.is_file():
        ckpt_path.unlink()
    return model
