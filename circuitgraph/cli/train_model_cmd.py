"""``circuitgraph train-toy-model``: re-create the embedded default model from scratch."""

from __future__ import annotations

import argparse

from circuitgraph.cli.config_flags import add_dataclass_flags, dataclass_from_flags
from circuitgraph.models.loading import DEFAULT_MODEL_DIR
from circuitgraph.models.toy_training import ToyModelConfig, ToyTrainConfig, train_toy_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-toy-model", help="train the embedded default model on the toy language",
                       description="Train the embedded default model; resumes from OUT/train_checkpoint.safetensors.")
    p.add_argument("--out", default=str(DEFAULT_MODEL_DIR), help=f"output folder (default: {DEFAULT_MODEL_DIR})")
    add_dataclass_flags(p, ToyModelConfig)
    add_dataclass_flags(p, ToyTrainConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from circuitgraph.graph.storage import check_writable

    check_writable(args.out)  # before any work: a bad --out must not cost a whole training run
    model_cfg = dataclass_from_flags(ToyModelConfig, args)
    train_cfg = dataclass_from_flags(ToyTrainConfig, args)
    train_toy_model(args.out, model_cfg, train_cfg)
    return 0
