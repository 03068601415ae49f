"""`circuitgraph report --study`: the ceiling study's rows rendered as a table and a chart."""

from __future__ import annotations

import json

from circuitgraph.cli.main import main
from circuitgraph.viewer.study_plot import TASKS, study_markdown


def _row(name: str, ceiling: float) -> dict:
    return {"lever": name, "latents": 4096, "ce_recovered_min": 0.95, "ce_recovered_mean": 0.98, "fvu_mean": 0.06,
            "l0_mean": 16.0, "dead_max": 0.04, "train_s": 300.0,
            "tasks": {t: {"ceiling": ceiling, "nodes": 120, "reached_on_selection": t != "ioi", "features_only": 0.81}
                      for t in TASKS}}


def test_report_renders_the_study(tmp_path, capsys):
    rows = [_row("base", 0.4), _row("<script>alert(1)</script>", 0.9)]
    study = tmp_path / "results.jsonl"
    study.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "r.html"
    assert main(["report", "--study", str(study), "--out", str(out)]) == 0
    page = out.read_text()
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page
    assert page.count("<rect x=") >= 2 * len(TASKS)  # one bar per recipe and task
    md = study_markdown(rows)
    assert "| base | 4096 | 0.950 / 0.980 | 0.060 | 16.0 | 0.040 | 300 | 0.400 / >120 (0.81) | 0.400 / 120 (0.81)" in md


def test_report_refuses_a_file_that_is_not_a_study(tmp_path):
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"lever": "a"}\n')
    assert main(["report", "--study", str(bad), "--out", str(tmp_path / "r.html")]) == 2
    assert main(["report", "--out", str(tmp_path / "r.html")]) == 2
