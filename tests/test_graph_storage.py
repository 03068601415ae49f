"""Graph folders are atomic and versioned: kills, concurrent writers and readers, stale files, bad outputs."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from circuitgraph.cli.main import main
from circuitgraph.errors import CircuitGraphError
from circuitgraph.graph import storage
from circuitgraph.graph.graph import Graph
from circuitgraph.graph.nodes import Node

ROOT = Path(__file__).resolve().parents[1]


def make_graph(seed: int, n: int = 200) -> Graph:
    """A graph whose every tensor, label and feature card depends on ``seed`` (same node count)."""
    g = torch.Generator().manual_seed(seed)
    nodes = [Node("feature", float(i % 4), f"L{i % 4}.transcoder", i, None) for i in range(n)]
    src = torch.randint(0, n, (5000,), generator=g)
    return Graph(nodes, torch.rand(n, generator=g), src, torch.randint(0, n, (5000,), generator=g),
                 torch.randn(5000, generator=g), torch.rand(n, generator=g), labels=[f"s{seed}-{i}" for i in range(n)],
                 metadata={"seed": seed}, features={f"L0.transcoder#{i}": {"seed": seed, "i": i} for i in range(50)})


def same(a: Graph, b: Graph) -> bool:
    return (torch.equal(a.weights, b.weights) and torch.equal(a.sources, b.sources) and a.labels == b.labels
            and a.metadata == b.metadata and a.features == b.features)


WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from tests.test_graph_storage import make_graph
    graphs = [make_graph(int(s)) for s in sys.argv[2:]]
    i = 0
    while True:
        graphs[i % len(graphs)].save(sys.argv[1])
        i += 1
""")


def _writer(folder: Path, seeds: list[int]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER.format(root=str(ROOT)), str(folder), *map(str, seeds)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_kill_at_any_point_of_a_save_leaves_a_whole_graph(tmp_path):
    folder = tmp_path / "G"
    a, b = make_graph(1), make_graph(2)
    a.save(folder)
    rng = random.Random(0)
    for _ in range(12):
        proc = _writer(folder, [1, 2])
        time.sleep(1.0 + rng.random() * 0.5)  # past the start-up, at a random point of some save
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        loaded = Graph.load(folder)
        assert same(loaded, a) or same(loaded, b)


def test_concurrent_writers_and_readers_never_see_a_mix(tmp_path):
    folder = tmp_path / "G"
    graphs = {s: make_graph(s) for s in (1, 2, 3)}
    graphs[1].save(folder)
    first = folder.resolve()
    writers = [_writer(folder, [1, 2]), _writer(folder, [3])]
    try:
        start = time.time()
        while folder.resolve() == first and time.time() < start + 120:  # the writers have started
            time.sleep(0.05)
        deadline, loads, seen = time.time() + 4.0, 0, set()
        while time.time() < deadline:
            g = Graph.load(folder)
            match = [s for s, ref in graphs.items() if same(g, ref)]
            assert len(match) == 1, "a load mixed two versions"
            seen.add(match[0])
            loads += 1
        assert loads > 20 and len(seen) >= 2  # the writers really did switch versions under the reader
    finally:
        for w in writers:
            w.kill()
            w.wait()
        assert all(w.returncode == -signal.SIGKILL for w in writers)  # neither writer crashed on its own


def test_stale_files_are_never_attached(tmp_path):
    folder = tmp_path / "G"
    with_features = make_graph(1)
    with_features.save(folder, children={"full": make_graph(5)})
    assert (folder / "full").is_dir() and Graph.load(folder / "full").metadata == {"seed": 5}
    plain = make_graph(2)
    plain.features = {}
    plain.save(folder)
    loaded = Graph.load(folder)
    assert loaded.features == {} and not (folder / "full").exists()


def test_leftovers_of_killed_saves_are_cleaned_and_modes_consistent(tmp_path, monkeypatch):
    folder = tmp_path / "G"
    make_graph(1).save(folder)
    leftover = tmp_path / ".G.v-00000000000000000001-dead"  # what a killed save leaves
    leftover.mkdir()
    (leftover / "graph.safetensors").write_bytes(b"x" * 1000)
    monkeypatch.setattr(storage, "KEEP_SECONDS", 0.0)
    make_graph(2).save(folder)
    make_graph(3).save(folder)
    assert not leftover.exists()
    versions = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".G.v-"))
    assert len(versions) == 2  # the current one and the one before
    modes = {p.stat().st_mode & 0o777 for p in folder.resolve().iterdir()}
    assert modes == {storage.file_mode()}  # every file as an ordinary new file (0644 under umask 022)


def test_a_changed_file_is_refused(tmp_path):
    folder = tmp_path / "G"
    make_graph(1).save(folder, children={"full": make_graph(4)})
    path = folder.resolve() / "features.json"
    path.write_text(json.dumps({"L0.transcoder#0": {"seed": 9}}))
    with pytest.raises(CircuitGraphError, match="does not match its recorded digest"):
        Graph.load(folder)
    child = folder / "full" / "graph.json"  # a child graph is checked against the parent's manifest
    child.write_text(child.read_text().replace("s4-0", "s4-X"))
    with pytest.raises(CircuitGraphError, match="does not match its recorded digest"):
        Graph.load(folder / "full")


def test_a_folder_that_is_not_a_graph_is_never_replaced(tmp_path, capsys, v1_dicts):
    """--out naming a folder of other files (a project folder, a dictionary folder) is refused, never moved."""
    from circuitgraph.models.loading import V1_DICTS_DIR

    results = tmp_path / "results"
    (results / "sub").mkdir(parents=True)
    (results / "notes.txt").write_text("precious")
    with pytest.raises(CircuitGraphError, match="is not a graph folder"):
        make_graph(1).save(results)
    assert (results / "notes.txt").read_text() == "precious" and not results.is_symlink()
    dicts = tmp_path / "dicts"
    import shutil

    shutil.copytree(V1_DICTS_DIR / "L0.attn_z", dicts / "L0.attn_z")
    argv = ["trace", "--task", "ioi", "--n", "4", "--dicts", str(dicts), "--sites", "attn_z", "--layers", "0",
            "--out", str(dicts)]
    assert main(argv) == 2 and "is not a graph folder" in capsys.readouterr().err
    assert (dicts / "L0.attn_z" / "cfg.json").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    make_graph(1).save(empty)  # an empty folder made for the output is fine
    assert same(Graph.load(empty), make_graph(1))


def test_nan_weights_are_refused_and_json_stays_valid(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    make_graph(1).save(tmp_path / "nan")
    g = make_graph(2)
    g.weights[3] = float("nan")
    with pytest.raises(CircuitGraphError, match="NaN or infinite values in 'weights'; nothing was saved"):
        g.save(tmp_path / "nan")
    assert same(Graph.load(tmp_path / "nan"), make_graph(1))  # the previous graph is untouched
    legacy = tmp_path / "legacy"  # a folder written some other way (no manifest) with a NaN weight
    legacy.mkdir()
    for name in ("graph.json", "features.json"):
        (legacy / name).write_bytes(((tmp_path / "nan") / name).read_bytes())
    t = load_file(str(tmp_path / "nan" / "graph.safetensors"))
    t["weights"][3] = float("nan")
    save_file(t, str(legacy / "graph.safetensors"))
    with pytest.raises(CircuitGraphError, match="NaN or infinite values in 'weights'"):
        Graph.load(legacy)
    ok = make_graph(2)
    ok.metadata["faithfulness"] = float("nan")
    ok.save(tmp_path / "ok")
    assert Graph.load(tmp_path / "ok").metadata["faithfulness"] is None
    assert main(["query", str(tmp_path / "ok"), "--nodes", "--top-k", "3", "--json"]) == 0
    json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))


@pytest.mark.parametrize("argv,message", [
    (["supernodes", "{g}", "--out", "{g}"], "would overwrite the input"),
    (["export", "{g}", "--format", "node-link", "--out", "{g}/graph.json"], "would overwrite the input"),
    (["view", "{g}", "--out", "{g}/page.html"], "would overwrite the input"),
    (["query", "{g}", "--paths", "L0.transcoder#0", "L1.transcoder#1", "--top-k", "0"], "--top-k and --depth"),
    (["query", "{g}", "--upstream", "L1.transcoder#1", "--top-k", "-1"], "--top-k and --depth"),
    (["trace", "--task", "ioi", "--n", "4", "--out", "{f}/sub"], "is a file, not a folder"),
    (["view", "{g}", "--max-nodes", "0", "--out", "{f}.html"], "--max-nodes 0"),
    (["supernodes", "{g}", "--min-size", "0", "--out", "{f}.sn"], "--min-size 0"),
    (["supernodes", "{g}", "--no-decoders", "--out", "{p}"], "would overwrite the input"),
    (["trace", "--prompt", "a b", "--node-threshold", "nan", "--out", "{f}.p"], "--node-threshold nan"),
    (["trace", "--prompt", "a b", "--edge-threshold", "5", "--out", "{f}.p"], "--edge-threshold 5.0"),
    (["query", "{g}", "--paths", "L0.transcoder#0", "L1.transcoder#1", "--top-k", "5000"], "--top-k 5000"),
])
def test_outputs_are_refused_before_any_work(tmp_path, capsys, argv, message):
    g = tmp_path / "G"
    make_graph(1).save(g)
    before = sorted(p.name for p in g.resolve().iterdir())
    f = tmp_path / "file"
    f.write_text("x")
    start = time.perf_counter()
    assert main([a.format(g=g, f=f, p=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert time.perf_counter() - start < 5  # refused up front, not after the work
    assert sorted(p.name for p in g.resolve().iterdir()) == before and same(Graph.load(g), make_graph(1))


def test_a_link_no_save_made_is_not_replaced(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "data.csv").write_text("keep")
    (tmp_path / "G").symlink_to(target)
    with pytest.raises(CircuitGraphError, match="is a link that no graph save made"):
        make_graph(1).save(tmp_path / "G")
    assert (tmp_path / "G").resolve() == target and (target / "data.csv").read_text() == "keep"
