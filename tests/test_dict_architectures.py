"""Every architecture: exact equations on hand-set weights, invariants, persistence and bad files."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dictionaries.architectures.registry import REGISTRY, build_dictionary, register
from dictionaries.config import ARCHITECTURES, DictionaryConfig
from dictionaries.errors import DictionaryError
from dictionaries.persistence import dictionary_state_equal, load_dictionary, save_dictionary
from dictionaries.saelens_format import load_saelens, save_saelens
from dictionaries.site import Site


def make(arch: str, d_in: int = 8, d_dict: int = 32, d_out: int = 0, skip: bool = False):
    d = build_dictionary(DictionaryConfig(arch=arch, d_in=d_in, d_dict=d_dict, d_out=d_out, k=4, skip=skip), seed=1)
    with torch.no_grad():  # make every parameter non-trivial
        for p in d.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        d.norm_in.fill_(1.7)
        d.norm_out.fill_(0.6)
    return d


def test_relu_equation_on_hand_set_weights() -> None:
    d = build_dictionary(DictionaryConfig(arch="relu", d_in=2, d_dict=2))
    with torch.no_grad():
        d.W_enc.copy_(torch.tensor([[1.0, -1.0], [0.5, 2.0]]))
        d.b_enc.copy_(torch.tensor([0.0, -1.0]))
        d.W_dec.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
        d.b_dec.copy_(torch.tensor([1.0, 1.0]))
    x = torch.tensor([[1.0, 1.0]])
    # pre = [1 + 0.5, -1 + 2 - 1] = [1.5, 0]; latents = [1.5, 0]; out = [3 + 1, 0 + 1]
    out = d(x)
    assert torch.equal(out.latents, torch.tensor([[1.5, 0.0]]))
    assert torch.equal(out.output, torch.tensor([[4.0, 1.0]]))
    terms = d.training_loss(x, torch.tensor([[4.0, 2.0]]))
    assert terms.mse.item() == pytest.approx(1.0)
    assert terms.sparsity.item() == pytest.approx(d.cfg.l1_coeff * 1.5 * 2.0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_forward_is_decode_of_encode(arch: str) -> None:
    d = make(arch)
    d.eval()
    x = torch.randn(16, 8)
    out = d(x)
    assert torch.allclose(out.output, d.decode(d.encode(x)), atol=1e-6)
    assert torch.equal(out.latents, d.encode(x))
    assert (out.latents >= 0).all()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_transcoder_with_skip(arch: str) -> None:
    d = make(arch, d_in=8, d_out=6, skip=True)
    d.eval()
    x = torch.randn(5, 8)
    out = d(x)
    assert out.output.shape == (5, 6)
    assert torch.allclose(out.output, d.decode(d.encode(x)) + d.skip_term(x), atol=1e-6)


def test_topk_keeps_k_and_batchtopk_keeps_k_per_token_on_average() -> None:
    x = torch.randn(64, 8)
    topk = make("topk")
    pre = topk.pre_acts(x * topk.norm_in)
    n_pos = (pre > 0).sum(-1)
    assert (n_pos >= 4).float().mean() > 0.5  # most rows have at least k positive pre-activations
    active = topk.encode(x) > 0
    assert torch.equal(active.sum(-1), n_pos.clamp(max=4))  # exactly k (fewer only when fewer are positive)
    assert torch.equal(active, (pre >= pre.topk(4, -1).values[:, -1:]) & (pre > 0))  # and they are the top k
    btk = make("batchtopk")
    btk.train()
    pre_b = btk.pre_acts(x * btk.norm_in)
    lat = btk.activation(pre_b)
    assert (lat > 0).sum().item() == min(4 * 64, int((pre_b > 0).sum()))
    assert btk.threshold.item() == 0  # activation alone (the interaction penalty's call) never moves the threshold
    btk.training_loss(x, x)
    assert btk.threshold.item() == pytest.approx(float(lat[lat > 0].min()))  # training sets it
    btk.eval()
    pre = btk.pre_acts(x * btk.norm_in)
    assert torch.equal(btk.encode(x), pre * (pre > btk.threshold))


def test_jumprelu_threshold_gets_a_pseudo_gradient() -> None:
    d = make("jumprelu")
    x = torch.randn(256, 8)
    terms = d.training_loss(x, x)
    terms.total.backward()
    assert d.log_threshold.grad is not None and d.log_threshold.grad.abs().sum() > 0


def test_unit_norm_decoder_is_kept() -> None:
    d = make("topk")
    x = torch.randn(32, 8)
    d.training_loss(x, x).total.backward()
    d.remove_parallel_gradient()
    w = d.W_dec.detach() / d.W_dec.detach().norm(dim=1, keepdim=True)
    assert (d.W_dec.grad * w).sum(1).abs().max() < 1e-5
    d.constrain_decoder()
    assert torch.allclose(d.W_dec.norm(dim=1), torch.ones(d.cfg.d_dict), atol=1e-6)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_load_round_trip(arch: str, tmp_path) -> None:
    d = make(arch, skip=arch == "relu", d_out=6 if arch == "relu" else 0)
    save_dictionary(d, tmp_path / "x")
    e = load_dictionary(tmp_path / "x")
    assert dictionary_state_equal(d, e)
    assert e.cfg == d.cfg


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu", "gated", "batchtopk"])
def test_saelens_round_trip_gives_same_outputs(arch: str, tmp_path) -> None:
    d = make(arch)
    d.eval()
    save_saelens(d, tmp_path / "sl", site=Site(0, "resid_post"))
    e = load_saelens(tmp_path / "sl")
    x = torch.randn(20, 8)
    assert torch.allclose(d(x).output, e(x).output, atol=1e-5)
    assert torch.allclose(d.encode(x), e.encode(x), atol=1e-5)


def test_saelens_apply_b_dec_to_input_is_folded(tmp_path) -> None:
    import json

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    W_enc, W_dec = torch.randn(4, 6, generator=g), torch.randn(6, 4, generator=g)
    b_enc, b_dec = torch.randn(6, generator=g), torch.randn(4, generator=g)
    folder = tmp_path / "L0.resid_post"  # no hook in the config: the folder names the site
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": 4, "d_sae": 6,
                                                "apply_b_dec_to_input": True, "normalize_activations": "none"}))
    save_file({"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}, str(folder / "sae_weights.safetensors"))
    d = load_saelens(folder)
    x = torch.randn(3, 4, generator=g)
    expected = torch.relu((x - b_dec) @ W_enc + b_enc) @ W_dec + b_dec
    assert torch.allclose(d(x).output, expected, atol=1e-5)


def test_bad_files_are_clear_errors(tmp_path) -> None:
    d = make("topk")
    folder = save_dictionary(d, tmp_path / "x")
    w = folder / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:200])
    with pytest.raises(DictionaryError, match="corrupt or truncated"):
        load_dictionary(folder)
    save_dictionary(make("topk", d_dict=16), tmp_path / "y")
    (tmp_path / "y" / "cfg.json").write_text((folder / "cfg.json").read_text())  # d_dict 32 config, 16-wide weights
    with pytest.raises(DictionaryError, match="does not match"):
        load_dictionary(tmp_path / "y")
    with pytest.raises(DictionaryError, match="not a dictionary folder"):
        load_dictionary(tmp_path / "missing")


def test_registry_and_config_reject_bad_names() -> None:
    with pytest.raises(ValueError, match="unknown architecture 'bogus'"):
        DictionaryConfig(arch="bogus", d_in=4, d_dict=8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already registered"):
        register("topk", REGISTRY["topk"])
    with pytest.raises(ValueError, match="k=40"):
        DictionaryConfig(arch="topk", d_in=4, d_dict=8, k=40)


@pytest.mark.parametrize("arch", ["relu", "gated"])
def test_resampling_revives_dead_latents(arch: str) -> None:
    from dictionaries.resampling import resample_dead

    d = make(arch)
    opt = torch.optim.Adam(d.parameters(), lr=1e-3)
    x = torch.randn(64, 8)
    d.training_loss(x, x).total.backward()
    opt.step()
    dead = torch.tensor([0, 5, 7])
    d.tokens_since_fired[dead] = d.cfg.dead_after_tokens
    before = d.W_dec.detach().clone()
    with torch.no_grad():
        err = x * d.norm_out - d(x).output * d.norm_out  # what the dictionary gets wrong, scaled space
    n = resample_dead(d, opt, x, x, generator=torch.Generator().manual_seed(0))
    assert n == 3
    assert torch.allclose(d.W_dec[dead].norm(dim=1), torch.ones(3), atol=1e-5)  # unit error directions
    alive = torch.ones(d.cfg.d_dict, dtype=torch.bool)
    alive[dead] = False
    assert torch.equal(d.W_dec[alive], before[alive])  # live latents untouched
    assert (d.b_enc[dead] == 0).all() and (d.tokens_since_fired[dead] == 0).all()
    assert (opt.state[d.W_dec]["exp_avg"][dead] == 0).all()
    # each new decoder row is the direction of one input's reconstruction error
    cos = F.normalize(err, dim=1) @ d.W_dec.detach()[dead].T
    assert cos.max(0).values.min() > 0.999


def _dense_topk_loss(d, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The TopK + AuxK training loss written densely, for autograd to differentiate."""
    x_s, y_s = x * d.norm_in, y * d.norm_out
    pre = x_s @ d.W_enc + d.b_enc
    recon = d._recon_scaled(x_s, d.activation(pre))
    mse = (recon - y_s).pow(2).sum(-1).mean()
    dead = d.dead_mask()
    k_aux = min(d.cfg.aux_k_resolved, int(dead.sum()))
    dead_pre = pre.masked_fill(~dead, float("-inf"))
    top = dead_pre.topk(k_aux, dim=-1)
    aux_latents = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    err_hat = aux_latents @ d.W_dec
    return mse + d.cfg.aux_coeff * (err_hat - (y_s - recon).detach()).pow(2).sum(-1).mean()


@pytest.mark.parametrize("d_out, skip", [(0, False), (6, True)])
def test_sparse_topk_training_matches_dense_autograd(d_out: int, skip: bool) -> None:
    """The sparse backward of TopK training (k encoder columns and decoder rows per token, CSR
    products) gives the loss and every gradient of the dense formulation, AuxK included."""
    d = make("topk", d_out=d_out, skip=skip).double()
    d.train()
    d.tokens_since_fired[::3] = d.cfg.dead_after_tokens  # a third of the latents dead: AuxK is on
    x = torch.randn(50, 8, dtype=torch.float64)
    y = torch.randn(50, d.cfg.out_width, dtype=torch.float64)
    terms = d.training_loss(x, y)
    assert terms.aux.item() > 0
    grads = torch.autograd.grad(terms.total, list(d.parameters()))
    ref = _dense_topk_loss(d, x, y)
    ref_grads = torch.autograd.grad(ref, list(d.parameters()))
    torch.testing.assert_close(terms.total, ref, rtol=1e-10, atol=1e-12)
    for (name, _), g, r in zip(d.named_parameters(), grads, ref_grads, strict=True):
        assert r.abs().max() > 0, name
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


def test_sparse_code_input_gradient_matches_dense() -> None:
    from dictionaries.architectures.sparse_code import sparse_code

    g = torch.Generator().manual_seed(3)
    x = torch.randn(20, 5, dtype=torch.float64, generator=g).requires_grad_()
    w_enc = torch.randn(5, 12, dtype=torch.float64, generator=g).requires_grad_()
    b_enc = torch.randn(12, dtype=torch.float64, generator=g).requires_grad_()
    w_dec = torch.randn(12, 4, dtype=torch.float64, generator=g).requires_grad_()
    idx = (x @ w_enc + b_enc).detach().topk(3, dim=-1).indices

    def f(x, w_enc, b_enc, w_dec):
        code = sparse_code(x, w_enc, b_enc, w_dec, idx, (x @ w_enc + b_enc).gather(1, idx))
        return code.recon, code.vals

    assert torch.autograd.gradcheck(f, (x, w_enc, b_enc, w_dec))
