"""Where a dictionary reads and writes: the one module that builds TransformerLens hook names.

A :class:`Site` is a layer and a kind. Kinds:

========== =================================== ====================== ============
kind       reads (input hook)                   reconstructs           width
========== =================================== ====================== ============
resid_pre  ``blocks.L.hook_resid_pre``          the same activation    d_model
resid_mid  ``blocks.L.hook_resid_mid``          the same activation    d_model
resid_post ``blocks.L.hook_resid_post``         the same activation    d_model
mlp_out    ``blocks.L.hook_mlp_out``            the same activation    d_model
attn_z     ``blocks.L.attn.hook_z`` (all heads) the same activation    n_heads*d_head
mlp_post   ``blocks.L.mlp.hook_post`` (neurons) the same activation    d_mlp
transcoder ``blocks.L.ln2.hook_normalized``     ``blocks.L.hook_mlp_out`` d_model -> d_model
clt        ``blocks.L.hook_resid_mid``          ``hook_mlp_out`` of    d_model ->
                                                layers L..n-1          (n-L)*d_model
========== =================================== ====================== ============

``clt`` is one layer of a *cross-layer transcoder* ("Circuit Tracing", Transformer Circuits 2025):
its features read the residual stream before the MLP of layer L and write into the MLP output of
layer L and of every later layer (the decoder is the concatenation of those writes, layer L first).
The MLP output of layer j is reconstructed by the sum of the writes of every ``clt`` layer <= j,
so the ``clt`` sites of a set run from some layer to the last one (see
:mod:`dictionaries.cross_layer`). The error term of site ``Lj.clt`` is that of ``hook_mlp_out`` j.

Site ids are ``L{layer}.{kind}`` (``L2.resid_post``); they name folders, JSON keys and graph nodes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

SiteKind = Literal["resid_pre", "resid_mid", "resid_post", "mlp_out", "attn_z", "mlp_post", "transcoder", "clt"]
SITE_KINDS: tuple[str, ...] = get_args(SiteKind)
_ID = re.compile(r"^L(\d+)\.([a-z_]+)$")

_INPUT_HOOK = {
    "resid_pre": "blocks.{L}.hook_resid_pre",
    "resid_mid": "blocks.{L}.hook_resid_mid",
    "resid_post": "blocks.{L}.hook_resid_post",
    "mlp_out": "blocks.{L}.hook_mlp_out",
    "attn_z": "blocks.{L}.attn.hook_z",
    "mlp_post": "blocks.{L}.mlp.hook_post",
    "transcoder": "blocks.{L}.ln2.hook_normalized",
    "clt": "blocks.{L}.hook_resid_mid",
}


@dataclass(frozen=True, order=True)
class Site:
    """A dictionary's place in the model: ``layer`` and ``kind``."""

    layer: int
    """Block index, 0-based."""
    kind: SiteKind
    """What the dictionary reads and reconstructs (see the module table)."""

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise ValueError(f"unknown site kind {self.kind!r}; choose one of {', '.join(SITE_KINDS)}")
        if self.layer < 0:
            raise ValueError(f"layer {self.layer} is negative; layers count from 0")

    @property
    def id(self) -> str:
        """Stable string id, e.g. ``L2.resid_post``."""
        return f"L{self.layer}.{self.kind}"

    @property
    def input_hook(self) -> str:
        """The TransformerLens hook whose activation the dictionary encodes."""
        return _INPUT_HOOK[self.kind].format(L=self.layer)

    @property
    def output_hook(self) -> str:
        """The hook whose activation the dictionary reconstructs (differs for transcoders; for a
        cross-layer transcoder, the first of the MLP outputs it writes: its own layer's)."""
        if self.kind in ("transcoder", "clt"):
            return f"blocks.{self.layer}.hook_mlp_out"
        return self.input_hook

    @property
    def is_transcoder(self) -> bool:
        """Whether input and output hooks differ (transcoders and cross-layer transcoders)."""
        return self.kind in ("transcoder", "clt")

    @property
    def is_cross_layer(self) -> bool:
        """Whether the dictionary writes into this layer's MLP output and every later one."""
        return self.kind == "clt"

    def output_layers(self, n_layers: int) -> int:
        """How many consecutive layers' outputs the decoder writes (``n_layers - layer`` for ``clt``, else 1)."""
        return n_layers - self.layer if self.kind == "clt" else 1

    @property
    def is_per_head(self) -> bool:
        """Whether the activation is ``[..., n_heads, d_head]`` (flattened to one vector per token)."""
        return self.kind == "attn_z"

    def widths(self, cfg) -> tuple[int, int]:
        """``(d_in, d_out)`` for a model config with ``d_model``, ``d_mlp``, ``n_heads``, ``d_head``."""
        if self.kind == "attn_z":
            d = cfg.n_heads * cfg.d_head
        elif self.kind == "mlp_post":
            d = cfg.d_mlp
        else:
            d = cfg.d_model
        return d, d * self.output_layers(cfg.n_layers)

    def check_model(self, cfg) -> None:
        """Raise ``ValueError`` if this site does not exist in a model with config ``cfg``."""
        if self.layer >= cfg.n_layers:
            raise ValueError(
                f"site {self.id}: layer {self.layer} is out of range; the model has layers 0..{cfg.n_layers - 1}"
            )
        if self.kind in ("mlp_post", "transcoder", "mlp_out", "clt") and getattr(cfg, "attn_only", False):
            raise ValueError(f"site {self.id}: the model is attention-only and has no MLP")

    @classmethod
    def parse(cls, text: str) -> Site:
        """Parse a site id such as ``L2.resid_post``."""
        m = _ID.match(text.strip())
        if not m:
            raise ValueError(f"cannot parse site id {text!r}; expected L<layer>.<kind>, e.g. L2.resid_post")
        return cls(int(m.group(1)), m.group(2))  # type: ignore[arg-type]

    @classmethod
    def from_hook(cls, hook_name: str, out_hook: str | None = None) -> Site:
        """The site that reads TransformerLens hook ``hook_name`` and writes ``out_hook`` (``None`` or
        the same hook: an autoencoder). Inverse of :attr:`input_hook` / :attr:`output_hook`, for
        dictionaries other libraries saved with hook names. ``clt`` is never returned: one layer of a
        cross-layer transcoder writes several hooks, which no single ``out_hook`` names.
        ``blocks.L.mlp.hook_in`` is read as ``blocks.L.ln2.hook_normalized`` (the same activation).

        Raises:
            ValueError: the hooks are not a site, naming the hooks sites read.
        """
        out_hook = out_hook or hook_name
        # the MLP's input after ln2 under the name circuit-tracer's hooks (and TransformerLens 3's
        # TransformerBridge) give it: the same activation as ln2.hook_normalized
        hook_name = re.sub(r"^blocks\.(\d+)\.mlp\.hook_in$", r"blocks.\1.ln2.hook_normalized", hook_name)
        for kind, template in _INPUT_HOOK.items():
            if kind == "clt":
                continue
            m = re.fullmatch(re.escape(template).replace(re.escape("{L}"), r"(\d+)"), hook_name)
            if m is None:
                continue
            site = cls(int(m.group(1)), kind)  # type: ignore[arg-type]
            if site.output_hook == out_hook:
                return site
            if site.is_transcoder:
                raise ValueError(f"a dictionary reading {hook_name} and writing {out_hook} is not a site: the transcoder "
                                 f"site reading {hook_name} writes {site.output_hook}")
            break
        if out_hook != hook_name:
            raise ValueError(
                f"a transcoder reading {hook_name} and writing {out_hook} is not a site: transcoders here read "
                "blocks.L.ln2.hook_normalized (the MLP's normalised input) and write blocks.L.hook_mlp_out of the "
                "same layer; a different input (the residual stream before the normalisation, hook_mlp_in, ...) "
                "gives different features, so it cannot be mapped"
            )
        hooks = ", ".join(t.format(L="L") for k, t in _INPUT_HOOK.items() if k not in ("transcoder", "clt"))
        raise ValueError(f"hook {hook_name} is not a site; dictionaries here read one of {hooks} "
                         "(or blocks.L.ln2.hook_normalized -> blocks.L.hook_mlp_out for a transcoder)")


def expand_sites(kinds: str, layers: str, n_layers: int) -> list[Site]:
    """Sites for comma-separated ``kinds`` (``attn_z`` may be spelt ``attn``) at ``layers``
    (``all``, ``0,2,3`` or ``1-3``), checked against ``n_layers``."""
    aliases = {"attn": "attn_z", "mlp": "mlp_out", "neurons": "mlp_post", "resid": "resid_post"}
    names = [aliases.get(k.strip(), k.strip()) for k in kinds.split(",") if k.strip()]
    if not names:
        raise ValueError("no site kinds given; pass e.g. --sites resid_post,mlp_out,attn_z,transcoder")
    if layers.strip() == "all":
        idx = list(range(n_layers))
    else:
        idx = []
        for part in layers.split(","):
            lo, _, hi = part.strip().partition("-")
            try:
                idx.extend(range(int(lo), int(hi or lo) + 1))
            except ValueError as err:
                raise ValueError(f"cannot parse layers {layers!r}; use 'all', '0,2' or '1-3'") from err
    for layer in idx:
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {layer} is out of range; the model has layers 0..{n_layers - 1}")
    return [Site(layer, kind) for layer in idx for kind in names]  # type: ignore[arg-type]


class ModelHooks:
    """The other TransformerLens hook names the graph engine needs (splicing, freezing, components).

    Kept beside :class:`Site` so that hook strings are built in this one module.
    """

    embed = "hook_embed"
    pos_embed = "hook_pos_embed"
    final_scale = "ln_final.hook_scale"
    unembed_in = "unembed.hook_in"

    @staticmethod
    def pattern(layer: int) -> str:
        """Attention pattern ``[B, H, Pq, Pk]``."""
        return f"blocks.{layer}.attn.hook_pattern"

    @staticmethod
    def attn_scores(layer: int) -> str:
        """Pre-softmax attention scores ``[B, H, Pq, Pk]`` (masked entries ``-inf``)."""
        return f"blocks.{layer}.attn.hook_attn_scores"

    @staticmethod
    def ln_scale(layer: int, which: Literal["ln1", "ln2"]) -> str:
        """Normalisation scale of ``ln1`` (attention input) or ``ln2`` (MLP input)."""
        return f"blocks.{layer}.{which}.hook_scale"

    @staticmethod
    def mlp_pre(layer: int) -> str:
        """MLP pre-activation (the gate input for gated MLPs)."""
        return f"blocks.{layer}.mlp.hook_pre"

    @staticmethod
    def mlp_pre_linear(layer: int) -> str:
        """The linear branch of a gated MLP."""
        return f"blocks.{layer}.mlp.hook_pre_linear"

    @staticmethod
    def mlp_post(layer: int) -> str:
        """MLP neuron activations."""
        return f"blocks.{layer}.mlp.hook_post"

    @staticmethod
    def z(layer: int) -> str:
        """Per-head attention values mixed by the pattern ``[B, P, H, d_head]``."""
        return f"blocks.{layer}.attn.hook_z"

    @staticmethod
    def attn_out(layer: int) -> str:
        return f"blocks.{layer}.hook_attn_out"

    @staticmethod
    def mlp_out(layer: int) -> str:
        return f"blocks.{layer}.hook_mlp_out"

    @staticmethod
    def resid_pre(layer: int) -> str:
        return f"blocks.{layer}.hook_resid_pre"

    @staticmethod
    def resid_post(layer: int) -> str:
        return f"blocks.{layer}.hook_resid_post"

    @staticmethod
    def qkv_input(layer: int, which: Literal["q", "k", "v"]) -> str:
        """Per-head attention inputs ``[B, P, H, d_model]`` (needs ``cfg.use_split_qkv_input``)."""
        return f"blocks.{layer}.hook_{which}_input"

    @staticmethod
    def mlp_in(layer: int) -> str:
        """MLP input residual (needs ``cfg.use_hook_mlp_in``)."""
        return f"blocks.{layer}.hook_mlp_in"
