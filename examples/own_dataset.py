"""A circuit for your own JSONL dataset, with its honest numbers.

    .venv/bin/python examples/own_dataset.py [--out runs/own_dataset]

Writes a small prompt file (one JSON object per line: prompt, answer, wrong answer, corrupted
prompt), selects a circuit on some rows, measures it on the held-out rows, and saves the graph and
its HTML view. The same file works on the command line:
``circuitgraph trace --dataset runs/own_dataset/prompts.jsonl --out runs/own_dataset/graph``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
from pathlib import Path

import torch

import circuitgraph as cg

log = logging.getLogger("own_dataset")

NAMES = ("Bob", "Lily", "Oscar", "Ella", "Victor", "Mia", "Felix", "Ida")
PLACES = ("park", "store", "library", "beach")
OBJECTS = ("book", "cake", "map", "ring")


def write_prompts(path: Path, n: int = 48) -> Path:
    """``n`` rows of an indirect-object task phrased by hand: the answer is the name not repeated.
    The corrupted prompt repeats the other name, so its answer is swapped (patch ablation)."""
    rows = []
    pairs = [(a, b) for a, b in itertools.permutations(NAMES, 2)]
    for i in range(n):
        a, b = pairs[(i * 5) % len(pairs)]  # 5 is coprime with the 56 ordered pairs: every row distinct
        place, obj = PLACES[i % len(PLACES)], OBJECTS[(i // len(PLACES)) % len(OBJECTS)]
        prompt = f"When {a} and {b} went to the {place}, {b} gave a {obj} to"
        rows.append({"prompt": prompt, "answer": f" {a}", "wrong": f" {b}",
                     "corrupted_prompt": f"When {a} and {b} went to the {place}, {a} gave a {obj} to"})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main(out: str | Path = "runs/own_dataset", n_rows: int = 48, n_eval: int = 16, max_nodes: int = 200) -> dict:
    """Trace the circuit of the file's rows; returns the held-out numbers."""
    out = Path(out)
    prompts = write_prompts(out / "prompts.jsonl", n_rows)
    model = cg.load_model("default")
    dicts = cg.load_dictionaries("default", model=model)
    data = cg.PromptDataset.from_file(prompts, model)
    select, held_out = data.split(n_eval=n_eval, seed=1)
    graph = cg.trace(model, dicts, select, eval_data=held_out, max_nodes=max_nodes, progress=False)
    m = graph.metadata
    log.info("%d selection rows, %d held out; %d nodes (%d features + %d error nodes)", len(select),
             len(held_out), m["n_nodes"], m["n_feature_nodes"], m["n_error_nodes"])
    log.info("held out: faithfulness %.3f, features only %.3f (ceiling %.3f), errors only %.3f, completeness %.3f",
             m["faithfulness"], m["faithfulness_features_only"], m["ceiling"], m["faithfulness_errors_only"],
             m["completeness"])
    graph.save(out / "graph")
    cg.view(graph, out / "circuit.html")
    return {k: m[k] for k in ("faithfulness", "faithfulness_features_only", "faithfulness_errors_only", "ceiling",
                              "completeness", "n_nodes", "n_feature_nodes", "n_error_nodes", "held_out", "ablation")}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/own_dataset")
    torch.set_num_threads(2)
    main(parser.parse_args().out)
