"""Write the EleutherAI sparsify golden fixture: small sparse coders saved by sparsify itself, with
its recorded latents and outputs on fixed inputs.

    make bench-env && .venv-bench/bin/python benchmarks/make_golden_sparsify.py [--out tests/fixtures/sparsify]

The folder is laid out as one sparsify training run (one sub-folder per hookpoint, each written by
``SparseCoder.save_to_disk``):

* ``layers.0.mlp/``: a TopK transcoder (``transcode=True``) of the MLP of layer 0, with a linear skip;
* ``layers.1/``: a TopK SAE of the output of block 1 (the residual stream after it);
* ``layers.2.mlp/``: a TopK SAE of the MLP output of layer 2, with a skip (sparsify allows one).

Every weight gets random values from a fixed seed (sparsify initialises biases and the transcoder
decoder to zero, which would test nothing). Each coder is read back with ``SparseCoder.load_many``
(checking the writer) and run on 8 fixed inputs: ``expected.safetensors`` holds, per hookpoint,
the inputs, sparsify's ``latent_acts`` / ``latent_indices`` and its decoded output ``sae_out``.
``tests/test_sparsify_format.py`` loads the folder with our reader and must reproduce them to 1e-5.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from sparsify import SparseCoder, SparseCoderConfig

D_IN = 16
CODERS = {  # hookpoint -> (config, number of latents)
    "layers.0.mlp": SparseCoderConfig(num_latents=40, k=5, transcode=True, skip_connection=True),
    "layers.1": SparseCoderConfig(num_latents=48, k=6),
    "layers.2.mlp": SparseCoderConfig(num_latents=32, k=4, skip_connection=True),
}


@torch.no_grad()
def randomise(coder: SparseCoder, g: torch.Generator) -> None:
    """Seeded random values for every weight (unit-norm decoder rows, as sparsify keeps them)."""
    n, d = coder.encoder.weight.shape
    coder.encoder.weight.copy_(torch.randn(n, d, generator=g) / d**0.5)
    coder.encoder.bias.copy_(torch.randn(n, generator=g) * 0.1)
    w_dec = torch.randn(n, d, generator=g)
    coder.W_dec.copy_(w_dec / w_dec.norm(dim=1, keepdim=True))
    coder.b_dec.copy_(torch.randn(d, generator=g) * 0.1)
    if coder.W_skip is not None:
        coder.W_skip.copy_(torch.randn(d, d, generator=g) * 0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tests/fixtures/sparsify")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for hookpoint, cfg in CODERS.items():
        coder = SparseCoder(D_IN, cfg, device="cpu", dtype=torch.float32)
        randomise(coder, g)
        coder.save_to_disk(out / hookpoint)
    back = SparseCoder.load_many(str(out), local=True)
    assert sorted(back) == sorted(CODERS), f"sparsify read back {sorted(back)}"
    expected: dict[str, torch.Tensor] = {}
    for hookpoint, coder in back.items():
        x = torch.randn(8, D_IN, generator=g) * 2
        with torch.no_grad():
            res = coder(x)
        expected[f"{hookpoint}/inputs"] = x
        expected[f"{hookpoint}/latent_acts"] = res.latent_acts.contiguous()
        expected[f"{hookpoint}/latent_indices"] = res.latent_indices.contiguous()
        expected[f"{hookpoint}/sae_out"] = res.sae_out.contiguous()
        print(f"{hookpoint}: {coder.num_latents} latents, k={coder.cfg.k}, transcode={coder.cfg.transcode}, "
              f"skip={coder.W_skip is not None}, mean active {(res.latent_acts > 0).float().sum(-1).mean():.1f}")
    from importlib.metadata import version

    save_file(expected, str(out / "expected.safetensors"),
              metadata={"eai-sparsify": version("eai-sparsify"), "torch": torch.__version__,
                        "hookpoints": json.dumps(sorted(CODERS))})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
