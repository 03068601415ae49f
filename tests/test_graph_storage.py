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
    modes = {oct(p.stat().st_mode & 0o777) for p in folder.resolve().iterdir()}
    assert modes == {"0o644"}


def test_a_changed_file_is_refused(tmp_path):
    folder = tmp_path / "G"
    make_graph(1).save(folder)
    path = folder.resolve() / "features.json"
    path.write_text(json.dumps({"L0.transcoder#0": {"seed": 9}}))
    with pytest.raises(CircuitGraphError, match="does not match its recorded digest"):
        Graph.load(folder)


def test_nan_weights_are_refused_and_json_stays_valid(tmp_path, capsys):
    g = make_graph(1)
    g.weights[3] = float("nan")
    g.save(tmp_path / "nan")
    with pytest.raises(CircuitGraphError, match="NaN or infinite values in 'weights'"):
        Graph.load(tmp_path / "nan")
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
])
def test_outputs_are_refused_before_any_work(tmp_path, capsys, argv, message):
    g = tmp_path / "G"
    make_graph(1).save(g)
    before = sorted(p.name for p in g.resolve().iterdir())
    f = tmp_path / "file"
    f.write_text("x")
    start = time.perf_counter()
    assert main([a.format(g=g, f=f) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert time.perf_counter() - start < 5  # refused up front, not after the work
    assert sorted(p.name for p in g.resolve().iterdir()) == before and same(Graph.load(g), make_graph(1))
