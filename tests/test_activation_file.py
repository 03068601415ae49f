"""train-dictionaries --activations FILE: a dictionary trained on a user's activation tensor, no
model. Planted ground truth: rows are sparse combinations of known unit directions, and the
trained decoder must recover them; bad files and flag combinations are refused clearly."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from circuitgraph.cli.main import main
from dictionaries.activation_file import read_activation_file, train_on_activations
from dictionaries.checkpoint import save_training_state
from dictionaries.errors import DictionaryError
from dictionaries.metrics import mmcs
from dictionaries.persistence import dictionary_state_equal, load_dictionaries
from dictionaries.site import Site
from dictionaries.training import TrainConfig

D_IN, D_OUT, N_TRUE, ROWS = 32, 24, 64, 16384
FLAGS = ["--arch", "topk", "--k", "4", "--expansion", "4", "--batch-tokens", "1024", "--tokens", str(250 * 1024),
         "--dead-after-tokens", "20000", "--warmup-steps", "20"]


def planted(seed: int = 0, rows: int = ROWS):
    """Ground-truth input and output directions and rows built from ~3 active features each."""
    g = torch.Generator().manual_seed(seed)
    f_in = torch.nn.functional.normalize(torch.randn(N_TRUE, D_IN, generator=g), dim=1)
    f_out = torch.nn.functional.normalize(torch.randn(N_TRUE, D_OUT, generator=g), dim=1)
    codes = (torch.rand(rows, N_TRUE, generator=g) < 3 / N_TRUE) * (torch.rand(rows, N_TRUE, generator=g) + 0.5)
    return f_in, f_out, codes @ f_in, codes @ f_out


def _fvu(d, x, y) -> float:
    with torch.no_grad():
        out = d(x).output
    return float((out - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


def test_sae_recovers_planted_features_through_the_cli(tmp_path, capsys):
    f_in, _, x, _ = planted()
    save_file({"activations": x}, str(tmp_path / "acts.safetensors"), metadata={"site": "L2.resid_post",
                                                                               "model_name": "my-model"})
    assert main(["train-dictionaries", "--activations", str(tmp_path / "acts.safetensors"), "--out",
                 str(tmp_path / "out"), *FLAGS]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["site"] == "L2.resid_post" and report["tokens_per_dictionary"] == 250 * 1024
    (site, d), = load_dictionaries(tmp_path / "out").items()
    assert site == Site(2, "resid_post") and d.cfg.model_name == "my-model" and d.cfg.d_dict == 4 * D_IN
    assert mmcs(f_in, d.decoder_directions().detach()) >= 0.95
    _, _, held_out, _ = planted(seed=0, rows=ROWS + 2048)
    assert _fvu(d, held_out[ROWS:], held_out[ROWS:]) < 0.2  # k=4 cannot rebuild rows with more actives
    assert json.loads((tmp_path / "out" / "train_config.json").read_text())["k"] == 4


def test_transcoder_recovers_planted_output_features(tmp_path, capsys):
    """--site names a transcoder site; the decoder recovers the planted output directions and the
    encoder reads the planted input ones."""
    f_in, f_out, x, y = planted(seed=1)
    save_file({"activations": x, "targets": y}, str(tmp_path / "tc.safetensors"))
    assert main(["train-dictionaries", "--activations", str(tmp_path / "tc.safetensors"), "--site", "L1.transcoder",
                 "--out", str(tmp_path / "out"), *FLAGS]) == 0
    (site, d), = load_dictionaries(tmp_path / "out").items()
    assert site == Site(1, "transcoder") and (d.cfg.d_in, d.cfg.out_width) == (D_IN, D_OUT)
    assert mmcs(f_out, d.decoder_directions().detach()) >= 0.95
    live = d.decoder_directions().detach()
    best = torch.nn.functional.normalize(live, dim=1) @ torch.nn.functional.normalize(f_out, dim=1).T  # [d_dict, N_TRUE]
    matched = best.max(0).indices  # the latent that writes each planted output direction
    enc = torch.nn.functional.normalize(d.W_enc.detach().T[matched], dim=1)
    assert float((enc * f_in).sum(1).mean()) > 0.5  # and it reads the matching input direction
    _, _, hx, hy = planted(seed=1, rows=ROWS + 2048)
    assert _fvu(d, hx[ROWS:], hy[ROWS:]) < 0.2


def test_same_seed_same_weights_and_data_checked_on_resume(tmp_path):
    """Two runs give identical weights; a checkpoint resumes only on the data it was written with."""
    _, _, x, _ = planted(rows=4096)
    save_file({"activations": x}, str(tmp_path / "a.safetensors"))
    save_file({"activations": x.flip(0).contiguous()}, str(tmp_path / "b.safetensors"))
    acts = read_activation_file(tmp_path / "a.safetensors", site="L0.mlp_out")
    cfg = TrainConfig.of(arch="relu", expansion=2, tokens=8 * 1024, batch_tokens=1024)
    a = train_on_activations(acts, cfg, tmp_path / "r1").dictionaries[Site(0, "mlp_out")]
    b = train_on_activations(acts, cfg, tmp_path / "r2").dictionaries[Site(0, "mlp_out")]
    assert dictionary_state_equal(a, b)
    run = {"train_cfg": dataclasses.asdict(cfg), "sites": ["L0.mlp_out"], "data": acts.data_id}
    ck = tmp_path / "r3" / "train_checkpoint.safetensors"
    ck.parent.mkdir()
    save_training_state(ck, {"L0.mlp_out": a}, {"L0.mlp_out": torch.optim.Adam(a.parameters())}, run, 4)
    other = read_activation_file(tmp_path / "b.safetensors", site="L0.mlp_out")
    with pytest.raises(DictionaryError, match="other settings or sites; delete it or rerun with the same flags and data"):
        train_on_activations(other, cfg, tmp_path / "r3")
    assert train_on_activations(acts, cfg, tmp_path / "r3").tokens == 4 * 1024  # resumed at step 4 of 8


def _write(path: Path, tensors: dict, **meta) -> Path:
    save_file(tensors, str(path), metadata=meta or None)
    return path


@pytest.mark.parametrize("case,match", [
    ("missing", r"expected 'activations' \[n, d_in\]"),
    ("unknown", r"holds tensors \['activations', 'target'\]"),
    ("1d", r"'activations' is torch.float32 of shape \(64,\); it must be a non-empty 2-D float tensor"),
    ("int", "is torch.int64 of shape"),
    ("rows", "'activations' has 64 rows but 'targets' has 63"),
    ("nan", "'activations' holds NaN or inf in 1 rows"),
    ("nosite", "does not say which site"),
    ("badsite", "site 'resid3': cannot parse site id"),
    ("clt", "cross-layer transcoder trains jointly"),
    ("tc_no_targets", "L0.transcoder is a transcoder site: the file needs 'targets'"),
    ("sae_targets", "L0.resid_post reconstructs its own input, but the file holds 'targets'"),
    ("few_rows", "holds 64 rows, fewer than one batch of 1024"),
    ("corrupt", "not a readable safetensors file"),
    ("absent", "does not exist"),
])
def test_bad_files_refused(tmp_path, capsys, case, match):
    x = torch.randn(64, 8)
    p = tmp_path / "f.safetensors"
    site = {"site": "L0.resid_post"}
    files = {
        "missing": lambda: _write(p, {"targets": x}, **site),
        "unknown": lambda: _write(p, {"activations": x, "target": x.clone()}, **site),
        "1d": lambda: _write(p, {"activations": x[:, 0].contiguous()}, **site),
        "int": lambda: _write(p, {"activations": x.long()}, **site),
        "rows": lambda: _write(p, {"activations": x, "targets": x[:63].clone()}, site="L0.transcoder"),
        "nan": lambda: _write(p, {"activations": x.index_fill(0, torch.tensor([3]), float("nan"))}, **site),
        "nosite": lambda: _write(p, {"activations": x}),
        "badsite": lambda: _write(p, {"activations": x}, site="resid3"),
        "clt": lambda: _write(p, {"activations": x, "targets": x.clone()}, site="L0.clt"),
        "tc_no_targets": lambda: _write(p, {"activations": x}, site="L0.transcoder"),
        "sae_targets": lambda: _write(p, {"activations": x, "targets": x.clone()}, **site),
        "few_rows": lambda: _write(p, {"activations": x}, **site),
        "corrupt": lambda: p.write_bytes(b"not a safetensors file at all"),
        "absent": lambda: tmp_path / "nope.safetensors",
    }
    path = files[case]()
    code = main(["train-dictionaries", "--activations", str(path if case != "corrupt" else p), "--out",
                 str(tmp_path / "out"), "--batch-tokens", "1024", "--tokens", "2048"])
    assert code == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "out" / "L0.resid_post").exists()


@pytest.mark.parametrize("flags,match", [
    (["--text", "x.txt"], "drop --text"),
    (["--model", "gpt2"], "drop --model"),
    (["--interaction-penalty", "0.1"], "drop --interaction-penalty"),
    (["--e2e-kl-coeff", "1"], "drop --e2e-kl-coeff"),
])
def test_flags_that_need_a_model_refused(tmp_path, capsys, flags, match):
    _write(tmp_path / "a.safetensors", {"activations": torch.randn(2048, 8)}, site="L0.resid_post")
    assert main(["train-dictionaries", "--activations", str(tmp_path / "a.safetensors"), "--out", str(tmp_path / "o"),
                 "--batch-tokens", "1024", "--tokens", "2048", *flags]) == 2
    assert re.search(match, capsys.readouterr().err)


def test_site_without_activations_refused(tmp_path, capsys):
    assert main(["train-dictionaries", "--site", "L0.resid_post", "--out", str(tmp_path / "o")]) == 2
    assert "--site names the site of an --activations file" in capsys.readouterr().err


@pytest.mark.parametrize("extra,match", [
    (["--activations", "ACTS", "--model", "default"], "without a model or text (its site: --site); drop --model"),
    (["--activations", "ACTS", "--sites", "resid_post", "--layers", "1"], "drop --sites, --layers"),
    (["--activations", "ACTS", "--seq-len", "64"], "drop --seq-len"),
    (["--tokens-file", "TOKENS", "--seq-len", "64"], "--tokens-file gives the token sequences (and their length); "
                                                     "drop --seq-len"),
    (["--tokens-file", "LONG"], "holds sequences of 300 tokens; the model's context is 128"),
    (["--text", "TEXT", "--corpus-mix", "task-rich"], "--corpus-mix chooses the toy corpus"),
    (["--tokens-file", "FLOAT"], "'tokens' is torch.float32; token ids must be integers"),
    (["--tokens-file", "BIG"], "token ids range over 1..5000, but the model's vocabulary is 0..885"),
    (["--tokens-file", "NEG"], "token ids range over -1.."),
    (["--activations", "ACTS", "--model-batch", "4"], "drop --model-batch"),
    (["--tokens-file", "TOKENS", "--hf-split", "test"], "--hf-split read --hf-dataset, which is not given"),
    (["--sites", "resid_post", "--transcoder-skip"], "no transcoder site is trained"),
])
def test_train_flags_a_mode_ignores_are_refused(tmp_path, capsys, extra, match):
    files = {"ACTS": _write(tmp_path / "a.safetensors", {"activations": torch.randn(64, 8)}, site="L0.resid_post"),
             "TOKENS": _write(tmp_path / "t.safetensors", {"tokens": torch.randint(1, 800, (8, 32))}),
             "LONG": _write(tmp_path / "l.safetensors", {"tokens": torch.randint(1, 800, (8, 300))}),
             "TEXT": tmp_path / "t.txt",
             "FLOAT": _write(tmp_path / "f.safetensors", {"tokens": torch.rand(8, 32)}),
             "BIG": _write(tmp_path / "b.safetensors", {"tokens": torch.tensor([[1, 5000] * 16] * 8)}),
             "NEG": _write(tmp_path / "n.safetensors", {"tokens": torch.tensor([[-1, 5] * 16] * 8)})}
    files["TEXT"].write_text("When Mary and John went to the park. " * 50)
    argv = ["train-dictionaries", *[str(files.get(a, a)) for a in extra], "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
