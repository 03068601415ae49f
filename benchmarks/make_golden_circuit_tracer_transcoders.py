"""Write the circuit-tracer per-layer transcoder golden fixture: a small ``TranscoderSet`` saved by
circuit-tracer itself, with its recorded features and reconstructions on fixed inputs.

    make bench-ct-env && .venv-ct/bin/python benchmarks/make_golden_circuit_tracer_transcoders.py \
        [--out tests/fixtures/circuit_tracer_plt]

The set (3 layers, d_model 16, 24 features per layer, every layer with a linear skip) covers both
activation functions circuit-tracer's loader builds: layer 0 is ReLU (no threshold stored),
layers 1 and 2 are JumpReLU. Weights are random from a fixed seed. It is written with
``TranscoderSet.to_safetensors`` (``layer_{i}.safetensors``) plus the ``config.yaml`` that
circuit-tracer's cache keeps (``model_kind: transcoder_set``, ``feature_input_hook:
ln2.hook_normalized``, ``feature_output_hook: hook_mlp_out``), read back with its
``load_transcoders_from_cache`` (checking the writer) and run on 5 fixed input positions per
layer: ``expected.safetensors`` holds the inputs, the features (``encode``) and every layer's
reconstruction (``decode`` with the skip). ``tests/test_circuit_tracer_transcoders.py`` loads the
folder with our reader and must reproduce both to 1e-5.
"""

from __future__ import annotations

import argparse
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from circuit_tracer.transcoder.activation_functions import JumpReLU
from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, TranscoderSet
from circuit_tracer.utils.caching import load_transcoders_from_cache
from safetensors.torch import save_file

CONFIG = {"model_kind": "transcoder_set", "feature_input_hook": "ln2.hook_normalized",
          "feature_output_hook": "hook_mlp_out", "scan": "circuitgraph-golden"}


def build_set(n: int, d: int, f: int, g: torch.Generator) -> TranscoderSet:
    """``n`` random-weight layers: ReLU at layer 0, JumpReLU after, all with a skip."""
    layers = {}
    for i in range(n):
        act = F.relu if i == 0 else JumpReLU(torch.rand(f, generator=g) * 0.3, 0.1)
        t = SingleLayerTranscoder(d, f, act, i, skip_connection=True, device=torch.device("cpu"), dtype=torch.float32)
        with torch.no_grad():
            t.W_enc.copy_(torch.randn(f, d, generator=g) / d**0.5)
            t.b_enc.copy_(torch.randn(f, generator=g) * 0.1)
            t.W_dec.copy_(torch.randn(f, d, generator=g) / f**0.5)
            t.b_dec.copy_(torch.randn(d, generator=g) * 0.1)
            t.W_skip.copy_(torch.randn(d, d, generator=g) * 0.1)
        layers[i] = t
    return TranscoderSet(layers, feature_input_hook=CONFIG["feature_input_hook"],
                         feature_output_hook=CONFIG["feature_output_hook"], scan=CONFIG["scan"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tests/fixtures/circuit_tracer_plt")
    args = ap.parse_args()
    out = Path(args.out)
    g = torch.Generator().manual_seed(0)
    n, d, f = 3, 16, 24
    tset = build_set(n, d, f, g)
    tset.to_safetensors(str(out))
    (out / "config.yaml").write_text(yaml.dump(CONFIG))
    back, _ = load_transcoders_from_cache(out.name, cache_dir=out.parent, device=torch.device("cpu"),
                                          dtype=torch.float32, lazy_encoder=False, lazy_decoder=False)
    x = torch.randn(n, 5, d, generator=g)
    with torch.no_grad():
        feats = back.encode(x)
        recon = back.decode(feats, x)
        assert torch.equal(feats, tset.encode(x)), "circuit-tracer's own round trip changed the features"
    save_file({"inputs": x.contiguous(), "features": feats.contiguous(), "reconstruction": recon.contiguous()},
              str(out / "expected.safetensors"), metadata={"circuit-tracer": version("circuit-tracer")})
    print(f"wrote {out}: {n} layers, {f} features, mean L0 {(feats > 0).float().sum(-1).mean():.1f}, "
          f"skip {back.skip_connection}")


if __name__ == "__main__":
    main()
