"""Train many dictionaries at once from one activation stream.

Every step takes one batch of activations for every hook (one model forward per chunk serves
all layers and site kinds) and updates each dictionary with its own Adam optimizer. Learning
rate: linear warm-up, constant, then linear decay to zero over the last ``decay_frac`` of steps.
Checkpoints are atomic and resumable: a resumed run ends with exactly the weights of an
uninterrupted one (same seed, same data order). The loop itself (:func:`run_training`) takes any
batch source: the model's activation store here, or a user's activation file
(:mod:`dictionaries.activation_file`, ``train-dictionaries --activations``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from dictionaries import distributed
from dictionaries.activations import ActivationStore, StoreConfig
from dictionaries.architectures.base import SparseDictionary
from dictionaries.architectures.registry import build_dictionary
from dictionaries.checkpoint import restore_training_state, save_training_state
from dictionaries.config import CoderConfig, DictionaryConfig, from_flat, to_flat
from dictionaries.cross_layer import CLT_ARCHS, check_clt_sites, clt_losses, clt_sites, initialise_clt
from dictionaries.determinism import deterministic
from dictionaries.e2e import EndToEndConfig, e2e_kl, frozen_weights
from dictionaries.errors import DictionaryError
from dictionaries.interactions import InteractionConfig, InteractionPenalty, parse_pairs
from dictionaries.persistence import save_dictionaries
from dictionaries.site import Site
from dictionaries.stepper import DictionaryStepper
from dictionaries.token_sources import TokenSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one multi-dictionary training run, composed of the configs of its parts (the CLI
    flags are generated from these: a nested field's flags carry the prefix ``FLAT_PREFIX`` names,
    e.g. ``--k`` for ``coder.k`` and ``--interaction-penalty`` for ``interaction.penalty``).
    :meth:`of` builds one from those flat names."""

    FLAT_PREFIX: ClassVar[dict[str, str]] = {"coder": "", "store": "", "interaction": "interaction_", "e2e": "e2e_"}

    coder: CoderConfig = field(default_factory=CoderConfig)
    """What every dictionary is: architecture, width, sparsity settings (flags --arch, --k, ...)."""
    store: StoreConfig = field(default_factory=StoreConfig)
    """How activations are gathered and batched (flags --batch-tokens, --chunk-sequences, ...)."""
    interaction: InteractionConfig = field(default_factory=InteractionConfig)
    """The optional interaction-sparsity term (flags --interaction-*)."""
    e2e: EndToEndConfig = field(default_factory=EndToEndConfig)
    """The optional end-to-end KL term (flags --e2e-*)."""
    tokens: int = 2_000_000
    """Training tokens per dictionary (accepts 2M, 500k)."""
    lr: float = 4e-3
    """Peak Adam learning rate."""
    warmup_steps: int = 50
    """Linear learning-rate warm-up steps."""
    decay_frac: float = 0.2
    """Fraction of steps, at the end, over which the learning rate decays linearly to 0."""
    sparsity_warmup_frac: float = 0.05
    """Fraction of steps over which the L1/L0 coefficient ramps up from 0."""
    grad_clip: float = 1.0
    """Clip each dictionary's gradient to this global norm before every Adam step (0 disables).
    Losses live in the scaled space, so one value fits every site. Early gradients are large; left
    unclipped they inflate Adam's second-moment estimate and slow every later step
    (docs/benchmarks.md measures the effect)."""
    resample_every: int = 0
    """Resample dead latents every this many steps (relu, gated); 0 disables."""
    seed: int = 0
    """Seed of initialisation and data order."""
    checkpoint_every: int = 100
    """Steps between atomic checkpoints."""

    def __post_init__(self) -> None:
        for name in ("tokens", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        for name in ("lr", "grad_clip", "decay_frac", "sparsity_warmup_frac"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)} must be a finite number")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be positive")
        if self.warmup_steps < 0 or self.resample_every < 0:
            raise ValueError("warmup_steps and resample_every must be >= 0")
        if self.tokens < self.store.batch_tokens:
            raise ValueError(f"tokens={self.tokens} is less than one batch ({self.store.batch_tokens}); train on "
                             "more tokens")
        if not all(0 <= f <= 1 for f in (self.decay_frac, self.sparsity_warmup_frac)):
            raise ValueError("decay_frac and sparsity_warmup_frac must lie in [0, 1]")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip={self.grad_clip} is negative; pass a positive norm, or 0 to disable clipping")

    @classmethod
    def of(cls, **settings: Any) -> TrainConfig:
        """A config from flat setting names (the CLI's, with ``_``): ``TrainConfig.of(arch="topk",
        k=8, tokens=200_000, interaction_penalty=1.0)``."""
        return from_flat(cls, settings)

    def replace(self, **settings: Any) -> TrainConfig:
        """A copy with some flat settings changed (``cfg.replace(k=32, e2e_kl_coeff=10.0)``)."""
        return from_flat(TrainConfig, {**to_flat(self), **settings})

    @property
    def steps(self) -> int:
        return self.tokens // self.store.batch_tokens

    def dictionary_config(self, site: Site, d_in: int, d_out: int, model_name: str) -> DictionaryConfig:
        """The config of the dictionary at ``site`` (widths ``d_in -> d_out``)."""
        return self.coder.dictionary_config(d_in, d_out, site.id, model_name, transcoder=site.is_transcoder,
                                            out_layers=d_out // d_in if site.is_cross_layer else 1)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier at ``step``: warm-up, plateau, linear decay to 0."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_start = int(cfg.steps * (1 - cfg.decay_frac))
    if step >= decay_start and cfg.decay_frac > 0:
        return max(0.0, (cfg.steps - step) / max(1, cfg.steps - decay_start))
    return 1.0


class TrainResult(NamedTuple):
    """What :func:`train_dictionaries` returns."""

    dictionaries: dict[Site, SparseDictionary]
    """The trained dictionaries by site (also saved to disk)."""
    seconds: float
    """Wall-clock training time of this call."""
    tokens: int
    """Tokens each dictionary trained on in this call."""


@torch.no_grad()
def initialise_from_data(d: SparseDictionary, x: torch.Tensor, y: torch.Tensor) -> None:
    """Set input/output scales (mean squared norm becomes the width) and ``b_dec`` (the mean output)."""
    d.norm_in.fill_((x.shape[1] ** 0.5) / x.norm(dim=1).mean().clamp(min=1e-8))
    d.norm_out.fill_((y.shape[1] ** 0.5) / y.norm(dim=1).mean().clamp(min=1e-8))
    d.b_dec.copy_((y * d.norm_out).mean(0))


def _check_finite(batch: dict[str, torch.Tensor], sites: Sequence[Site], step: int, ckpt: Path) -> None:
    for site in sites:
        for hook in {site.input_hook, site.output_hook}:
            if not torch.isfinite(batch[hook]).all():
                raise DictionaryError(
                    f"NaN or inf in activations of site {site.id} ({hook}) at step {step}; training stopped. "
                    f"The last good checkpoint {ckpt} is intact; check the model and the token data (or activation file)"
                )


@deterministic()
def train_dictionaries(
    model: HookedTransformer,
    sites: Sequence[Site],
    source: TokenSource,
    cfg: TrainConfig,
    out_dir: str | Path,
    checkpoint: str | Path | None = None,
) -> TrainResult:
    """Train one dictionary per site from a shared activation stream; save them to ``out_dir``."""
    if not sites:
        raise DictionaryError("no sites to train; pass at least one site")
    for site in sites:
        try:
            site.check_model(model.cfg)
        except ValueError as err:
            raise DictionaryError(str(err)) from err
    try:
        check_clt_sites(sites, model.cfg.n_layers)
    except ValueError as err:
        raise DictionaryError(str(err)) from err
    if any(s.is_cross_layer for s in sites) and cfg.coder.arch not in CLT_ARCHS:
        raise DictionaryError(f"cross-layer transcoders train with --arch {', '.join(CLT_ARCHS)}, not {cfg.coder.arch}")
    ckpt_path = Path(checkpoint) if checkpoint else Path(out_dir) / "train_checkpoint.safetensors"
    penalty = _interaction_penalty(model, sites, cfg)
    hooks = sorted({h for s in sites for h in (s.input_hook, s.output_hook)})
    store = ActivationStore(model, hooks, source, cfg.store, seed=cfg.seed)
    dicts: dict[Site, SparseDictionary] = {}
    for i, site in enumerate(sites):
        d_in, d_out = site.widths(model.cfg)
        dcfg = cfg.dictionary_config(site, d_in, d_out, model.cfg.model_name)
        dicts[site] = build_dictionary(dcfg, seed=cfg.seed * 7919 + i).to(model.cfg.device)
    return run_training(dicts, store.batches, cfg, out_dir, ckpt_path, _model_terms(model, source, penalty, cfg, ckpt_path))


ExtraLoss = Callable[[int, dict[Site, SparseDictionary]], tuple[torch.Tensor, dict[str, str]]]
"""``(step, dicts) -> (loss term, progress-bar fields)``: terms beyond each dictionary's own loss."""


def run_training(dicts: dict[Site, SparseDictionary], batches: Callable[[int], Iterator[dict[str, torch.Tensor]]],
                 cfg: TrainConfig, out_dir: str | Path, checkpoint: str | Path | None = None,
                 extra_loss: ExtraLoss | None = None, data_id: str = "") -> TrainResult:
    """The training loop of freshly built ``dicts`` on ``batches(start_step)``, an endless iterator of
    ``{hook: [batch_tokens, width]}`` holding every site's input and output hook (``step`` s always
    the same batch). Initialises the dictionaries from the first batch, resumes from and writes atomic
    checkpoints (``data_id`` names the data; a resume on other data is refused), saves to ``out_dir``."""
    sites = list(dicts)
    out_dir = Path(out_dir)
    ckpt_path = Path(checkpoint) if checkpoint else out_dir / "train_checkpoint.safetensors"
    run_meta = {"train_cfg": asdict(cfg), "sites": [s.id for s in sites], "data": data_id}
    clt = clt_sites(sites)
    steppers = {s: DictionaryStepper(d, lr=cfg.lr, resample_every=cfg.resample_every, ckpt=ckpt_path,
                                       grad_clip=cfg.grad_clip)
                for s, d in dicts.items()}
    opts = {s.id: st.opt for s, st in steppers.items()}
    start = 0
    if ckpt_path.is_file():
        try:
            start = restore_training_state(ckpt_path, {s.id: d for s, d in dicts.items()}, opts, run_meta)
        except ValueError as err:
            raise DictionaryError(str(err)) from err
        log.info("resumed %d dictionaries from %s at step %d", len(dicts), ckpt_path, start)
    batch_iter = batches(start)
    bar = tqdm(range(start, cfg.steps), desc=f"train {len(dicts)} dictionaries", initial=start, total=cfg.steps,
               disable=not distributed.is_main())
    t0 = time.time()
    for step in bar:
        batch = next(batch_iter)
        _check_finite(batch, sites, step, ckpt_path)
        if step == 0:
            for s, d in dicts.items():
                init = initialise_clt if s.is_cross_layer else initialise_from_data
                init(d, batch[s.input_hook], batch[s.output_hook])
        lr_mult = lr_factor(step, cfg)
        sparsity_mult = min(1.0, (step + 1) / max(1, cfg.sparsity_warmup_frac * cfg.steps))
        xs = {s: distributed.shard_rows(batch[s.input_hook]) for s in sites}
        ys = {s: distributed.shard_rows(batch[s.output_hook]) for s in sites}
        terms = {s: steppers[s].losses(xs[s], ys[s], sparsity_mult, step) for s in sites if not s.is_cross_layer}
        if clt:  # cross-layer transcoders: one joint loss (each output reaches every earlier source)
            joint = clt_losses({s: dicts[s] for s in clt}, xs, ys, sparsity_mult)
            terms.update({s: steppers[s].check_finite(t, step) for s, t in joint.items()})
        total = sum(t.total for t in terms.values())
        postfix = {}
        if extra_loss is not None:
            extra, postfix = extra_loss(step, dicts)
            total = total + extra
        total.backward()
        stats = [steppers[s].update(terms[s], xs[s], ys[s], cfg.lr * lr_mult, step) for s in sites]
        dead = sum(float(d.dead_mask().float().mean()) for d in dicts.values()) / len(dicts)
        bar.set_postfix(L0=f"{sum(st.l0 for st in stats) / len(stats):.1f}",
                        FVU=f"{sum(st.fvu for st in stats) / len(stats):.3f}", dead=f"{100 * dead:.1f}%", **postfix)
        done = step + 1
        if done % cfg.checkpoint_every == 0 and done < cfg.steps and distributed.is_main():
            save_training_state(ckpt_path, {s.id: d for s, d in dicts.items()}, opts, run_meta, done)
    for d in dicts.values():
        d.eval()
    seconds = time.time() - t0
    if distributed.is_main():
        save_dictionaries(dicts, out_dir)
        (out_dir / "train_config.json").write_text(json.dumps(to_flat(cfg), indent=2) + "\n")  # the CLI flag names
        if ckpt_path.is_file():
            ckpt_path.unlink()
    distributed.barrier()
    log.info("trained %d dictionaries for %d steps in %.1f s", len(dicts), cfg.steps - start, seconds)
    return TrainResult(dicts, seconds, (cfg.steps - start) * cfg.store.batch_tokens)


def _model_terms(model: HookedTransformer, source: TokenSource, penalty: InteractionPenalty | None, cfg: TrainConfig,
                 ckpt_path: Path) -> ExtraLoss | None:
    """The interaction penalty and the end-to-end KL term (both need the model), or ``None``."""
    if penalty is None and cfg.e2e.kl_coeff == 0:
        return None

    def terms(step: int, dicts: dict[Site, SparseDictionary]) -> tuple[torch.Tensor, dict[str, str]]:
        total, postfix = torch.zeros((), device=model.cfg.device), {}
        if penalty is not None:
            rank, world = distributed.world()
            n_seq = cfg.interaction.sequences
            inter = penalty(dicts, penalty.capture(source.sequences((step * world + rank) * n_seq, n_seq))).total()
            if not torch.isfinite(inter):
                raise DictionaryError(f"the interaction penalty became {inter.item()} at step {step}; lower "
                                      f"interaction_penalty or the learning rate. The last good checkpoint {ckpt_path} is intact")
            ramp = min(1.0, (step + 1) / max(1, cfg.interaction.warmup_frac * cfg.steps))
            total = total + cfg.interaction.penalty * ramp * inter
            postfix["inter"] = f"{inter.item():.3g}"
        if cfg.e2e.kl_coeff > 0:
            rank, world = distributed.world()
            with frozen_weights(model):
                kl = sum(e2e_kl(model, dicts, source.sequences((step * world + rank) * cfg.e2e.sequences,
                                                                cfg.e2e.sequences)).values()) / len(dicts)
            if not torch.isfinite(kl):
                raise DictionaryError(f"the end-to-end KL term became {kl.item()} at step {step}; lower e2e_kl_coeff "
                                      f"or the learning rate. The last good checkpoint {ckpt_path} is intact")
            total = total + cfg.e2e.kl_coeff * len(dicts) * kl
            postfix["KL"] = f"{kl.item():.3g}"
        return total, postfix

    return terms


def _interaction_penalty(model: HookedTransformer, sites: Sequence[Site], cfg: TrainConfig) -> InteractionPenalty | None:
    if cfg.interaction.penalty == 0:
        return None
    if any(s.is_cross_layer for s in sites):
        raise DictionaryError("the interaction penalty does not support cross-layer transcoder (clt) sites; "
                              "train them without --interaction-penalty")
    try:
        pairs = parse_pairs(cfg.interaction.pairs, sites)
    except ValueError as err:
        raise DictionaryError(str(err)) from err
    if not pairs:
        raise DictionaryError(
            f"interaction_penalty is set but interaction_pairs={cfg.interaction.pairs!r} gives no pair among "
            f"{', '.join(s.id for s in sites)}; readers are resid_*, transcoder and mlp_out dictionaries after a writer"
        )
    log.info("interaction penalty %.3g on %d pairs: %s", cfg.interaction.penalty, len(pairs), ", ".join(p.id for p in pairs))
    return InteractionPenalty(model, pairs, cfg.interaction.weighting, cfg.interaction.keys)
