"""Write the circuit-tracer golden fixture: a small cross-layer transcoder saved by circuit-tracer
itself, with its recorded features and reconstructions on fixed inputs.

    make bench-ct-env && .venv-ct/bin/python benchmarks/make_golden_circuit_tracer.py [--out tests/fixtures/circuit_tracer_clt]

The CLT (3 layers, d_model 16, 24 features per layer, JumpReLU) gets random weights from a fixed
seed, is written with circuit-tracer's ``CrossLayerTranscoder.to_safetensors``, read back with
its ``load_clt`` (checking the writer), and run on 5 fixed input positions per layer:
``expected.safetensors`` holds the inputs, circuit-tracer's features (``encode``) and its
reconstruction of every layer's MLP output (``forward``). ``tests/test_cross_layer.py`` loads the
folder with our reader and must reproduce both to 1e-5.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import circuit_tracer
import torch
from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder, load_clt
from safetensors.torch import save_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tests/fixtures/circuit_tracer_clt")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    n, d, f = 3, 16, 24
    clt = CrossLayerTranscoder(n, f, d, activation_function="jump_relu", lazy_decoder=False, device=torch.device("cpu"),
                               dtype=torch.float32)
    with torch.no_grad():
        clt.W_enc.copy_(torch.randn(n, f, d, generator=g) / d**0.5)
        clt.b_enc.copy_(torch.randn(n, f, generator=g) * 0.1)
        clt.b_dec.copy_(torch.randn(n, d, generator=g) * 0.1)
        for i in range(n):
            clt.W_dec[i].copy_(torch.randn(f, n - i, d, generator=g) / f**0.5)
        clt.activation_function.threshold.copy_(torch.rand(n, 1, f, generator=g) * 0.3)
    clt.to_safetensors(str(out))
    back = load_clt(str(out), lazy_decoder=False, device=torch.device("cpu"), dtype=torch.float32)
    x = torch.randn(n, 5, d, generator=g)
    with torch.no_grad():
        feats = back.encode(x)
        recon = back.forward(x)
        assert torch.equal(feats, clt.encode(x)), "circuit-tracer's own round trip changed the features"
    (out / "config.yaml").write_text("model_kind: cross_layer_transcoder\nfeature_input_hook: hook_resid_mid\n"
                                     "feature_output_hook: hook_mlp_out\n")
    save_file({"inputs": x.contiguous(), "features": feats.contiguous(), "reconstruction": recon.contiguous()},
              str(out / "expected.safetensors"), metadata={"circuit_tracer": circuit_tracer.__version__
                                                           if hasattr(circuit_tracer, "__version__") else "0.5.0"})
    print(f"wrote {out}: {n} layers, {f} features, mean L0 {(feats > 0).float().sum(-1).mean():.1f}")


if __name__ == "__main__":
    main()
