"""The command line: JSON interfaces and one-line errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "circuitgraph", *args], capture_output=True, text=True, timeout=timeout)


def test_tasks_eval_json() -> None:
    out = run_cli("tasks", "eval", "--model", "default", "--n", "20", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result) == {"ioi", "agreement", "induction", "greater_than"}
    assert {"accuracy", "logit_diff"} <= set(result["ioi"])
    assert "accuracy" in result["agreement"] and "accuracy" in result["induction"]
    assert 0.0 <= result["greater_than"]["prob_mass"] <= 1.0


def test_bad_input_is_one_clear_line() -> None:
    cases = [
        (("tasks", "eval", "--tasks", "ioi,bogus"), "unknown task 'bogus'"),
        (("tasks", "eval", "--n", "0"), "--n 0"),
        (("tasks", "eval", "--model", "no/such/dir-or-name"), "needs the internet"),
    ]
    for args, message in cases:
        out = run_cli(*args)
        assert out.returncode == 2, (args, out.stderr)
        assert message in out.stderr
        assert "Traceback" not in out.stderr
