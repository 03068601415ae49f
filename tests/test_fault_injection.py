"""Real faults in subprocesses: SIGKILL at random points of training, and a full disk during a graph save."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from circuitgraph.graph.graph import Graph
from dictionaries.persistence import dictionary_state_equal, load_dictionaries

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, "-m", "circuitgraph", "--threads", "1", "train-dictionaries", "--sites", "resid_post,transcoder",
         "--layers", "0", "--tokens", "61440", "--batch-tokens", "1024", "--checkpoint-every", "3", "--k", "4",
         "--expansion", "2", "--seq-len", "64"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.mark.slow
def test_training_killed_at_random_points_resumes_to_identical_weights(tmp_path):
    straight = tmp_path / "straight"
    subprocess.run([*TRAIN, "--out", str(straight)], env=ENV, check=True, capture_output=True, timeout=600)
    out, ckpt, rng = tmp_path / "killed", tmp_path / "killed" / "train_checkpoint.safetensors", random.Random(0)
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen([*TRAIN, "--out", str(out)], env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        start = time.time()
        while not ckpt.exists() and proc.poll() is None and time.time() < start + 300:
            time.sleep(0.05)
        time.sleep(rng.random() * 1.5)  # a random point after a checkpoint exists: mid-step or mid-write
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 1
    subprocess.run([*TRAIN, "--out", str(out)], env=ENV, check=True, capture_output=True, timeout=600)
    a, b = load_dictionaries(straight), load_dictionaries(out)
    assert a.keys() == b.keys() and all(dictionary_state_equal(a[s], b[s]) for s in a)
    assert not list(out.glob("*.tmp*"))  # temporaries of the killed writes are gone


FULL_DISK = textwrap.dedent("""
    import resource, signal, sys
    sys.path.insert(0, {root!r})
    from tests.test_graph_storage import make_graph
    g = make_graph(2)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # writes past the limit fail with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # the disk is full after 20 kB per file
    from circuitgraph.errors import CircuitGraphError
    try:
        g.save(sys.argv[1])
    except CircuitGraphError as err:
        print(err)
        sys.exit(3)
""")


def test_full_disk_during_a_save_keeps_the_previous_graph(tmp_path):
    from tests.test_graph_storage import make_graph, same

    folder = tmp_path / "G"
    make_graph(1).save(folder)
    before = sorted(p.name for p in tmp_path.iterdir())
    out = subprocess.run([sys.executable, "-c", FULL_DISK.format(root=str(ROOT)), str(folder)], env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stderr[-2000:]
    assert "File too large" in out.stdout and "the previous contents are unchanged" in out.stdout
    assert same(Graph.load(folder), make_graph(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # the failed version was removed


def _tmpfs(path: Path, options: str):
    """Mount a small tmpfs at ``path`` (root ignores permission bits, not a read-only file system)."""
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root in a mount-capable sandbox)")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


@pytest.fixture
def read_only_dir(tmp_path):
    yield from _tmpfs(tmp_path / "ro", "size=1m,ro")


@pytest.fixture
def small_disk(tmp_path):
    yield from _tmpfs(tmp_path / "m", "size=4m")


@pytest.mark.parametrize("command", [
    ["train-dictionaries", "--sites", "resid_post", "--layers", "0", "--tokens", "8192"],
    ["trace", "--task", "ioi", "--n", "4", "--eval-n", "4", "--describe-seqs", "0"],
])
def test_read_only_location_is_refused_before_any_work(read_only_dir, capsys, command):
    from circuitgraph.cli.main import main

    start = time.time()
    assert main([*command, "--out", str(read_only_dir / "out")]) == 2
    err = capsys.readouterr().err
    assert "is not writable" in err and len(err.strip().splitlines()) == 1
    assert time.time() - start < 10


def test_read_only_graph_folder_keeps_its_graph(small_disk):
    """Saving over a graph on a file system that turned read-only: one clear error, the graph intact."""
    from circuitgraph.errors import CircuitGraphError
    from tests.test_graph_storage import make_graph, same

    make_graph(1).save(small_disk / "G")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(CircuitGraphError, match="not writable"):
        make_graph(2).save(small_disk / "G")
    assert same(Graph.load(small_disk / "G"), make_graph(1))


def _full_disk(limit: int):
    def preexec() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_full_disk_during_training_stops_with_one_line_and_keeps_nothing_torn(tmp_path):
    out = tmp_path / "d"
    proc = subprocess.run([*TRAIN, "--out", str(out)], env=ENV, capture_output=True, text=True, timeout=600,
                          preexec_fn=_full_disk(50_000))
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]  # (the lines before it are the progress bar)
    assert "could not write" in last and "Free some space" in last and "Traceback" not in proc.stderr
    assert not list(out.glob("*.tmp*"))  # the failed write's temporary is gone
