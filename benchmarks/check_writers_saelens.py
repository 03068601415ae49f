"""Check our SAELens writer against SAELens itself: write ours, load with ``SAE.load_from_disk``, compare.

    make bench-env && .venv-bench/bin/python benchmarks/check_writers_saelens.py

For every architecture ``save_saelens`` writes (SAEs, an ``attn_z`` SAE, transcoders with and without
a skip, our batchtopk as JumpReLU), random weights with non-unit input/output scales (so the folding
is exercised) are written, read back by SAELens, and run on the same inputs (``[N, n_heads, d_head]``
for ``hook_z``, as SAELens takes them). Prints the SAELens class, the hooks SAELens reads from the
config, the largest absolute differences of the features and the outputs, and the largest output
magnitude; exits 1 if a difference exceeds 1e-5 times max(1, that magnitude) (float32 rounding:
folding the scales into the weights reorders the arithmetic) or a hook or class differs.
"""

from __future__ import annotations

import sys
import tempfile

import torch
from sae_lens import SAE, __version__

from dictionaries.architectures.registry import build_dictionary
from dictionaries.config import DictionaryConfig
from dictionaries.saelens_format import save_saelens
from dictionaries.site import Site

CASES = [  # (our arch, skip, d_out, site, SAELens class)
    ("relu", False, 0, Site(0, "resid_post"), "StandardSAE"),
    ("topk", False, 0, Site(1, "mlp_out"), "TopKSAE"),
    ("jumprelu", False, 0, Site(1, "resid_pre"), "JumpReLUSAE"),
    ("gated", False, 0, Site(1, "resid_mid"), "GatedSAE"),
    ("batchtopk", False, 0, Site(2, "resid_post"), "JumpReLUSAE"),
    ("topk", False, 0, Site(0, "attn_z"), "TopKSAE"),
    ("relu", False, 0, Site(2, "transcoder"), "Transcoder"),
    ("relu", True, 0, Site(0, "transcoder"), "SkipTranscoder"),
    ("jumprelu", False, 0, Site(1, "transcoder"), "JumpReLUTranscoder"),
    ("jumprelu", True, 0, Site(1, "transcoder"), "JumpReLUSkipTranscoder"),
    ("batchtopk", True, 0, Site(2, "transcoder"), "JumpReLUSkipTranscoder"),
]
D_IN, D_DICT, N_HEADS, N = 32, 64, 4, 16


def main() -> int:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    worst, ok = 0.0, True
    print(f"sae_lens {__version__}")
    print(f"{'ours':>16s} {'site':>14s} -> {'SAELens class':24s} {'d features':>10s} {'d output':>9s} {'|output|':>9s}  hooks")
    for arch, skip, d_out, site, want_cls in CASES:
        d = build_dictionary(DictionaryConfig(arch=arch, d_in=D_IN, d_dict=D_DICT, d_out=d_out, k=6, skip=skip,
                                              site=site.id, model_name="gpt2"))
        with torch.no_grad():
            for p in d.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            d.norm_in.fill_(1.7)
            d.norm_out.fill_(0.6)
            if arch == "batchtopk":
                d.threshold.fill_(0.2)
        d.eval()
        with tempfile.TemporaryDirectory() as tmp:
            save_saelens(d, tmp, site=site)
            sae = SAE.load_from_disk(tmp)
        x = torch.randn(N, D_IN, generator=g)
        x_sl = x.reshape(N, N_HEADS, -1) if site.is_per_head else x
        with torch.no_grad():
            ours = d(x)
            feats, out = sae.encode(x_sl), sae(x_sl).reshape(N, -1)
        df = float((feats - ours.latents).abs().max())
        do = float((out - ours.output).abs().max())
        hooks = (sae.cfg.metadata.hook_name, sae.cfg.metadata.hook_name_out or sae.cfg.metadata.hook_name)
        scale = max(1.0, float(ours.output.abs().max()), float(ours.latents.abs().max()))
        good = (max(df, do) <= 1e-5 * scale and type(sae).__name__ == want_cls
                and hooks == (site.input_hook, site.output_hook) and bool((ours.latents > 0).any()))
        ok &= good
        worst = max(worst, max(df, do) / scale)
        name = f"{arch}{'+skip' if skip else ''}"
        print(f"{name:>16s} {site.id:>14s} -> {type(sae).__name__:24s} {df:10.2e} {do:9.2e} {scale:9.2f}  "
              f"{hooks[0]} -> {hooks[1]}"
              + ("" if good else "  MISMATCH"))
    print(f"largest difference relative to the output scale {worst:.2e}: {'all within 1e-5' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
