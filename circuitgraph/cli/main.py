"""The ``circuitgraph`` command: one sub-command per stage of the pipeline.

User errors (:class:`circuitgraph.errors.CircuitGraphError`) print one line naming the problem and
the fix, and exit with status 2; no traceback.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: spin-waiting is ~20x slower on shared cores

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

from circuitgraph.cli import (  # noqa: E402
    demo_cmd,
    dicts_cmd,
    graph_cmd,
    qk_cmd,
    supernodes_cmd,
    tasks_cmd,
    trace_cmd,
    train_model_cmd,
)
from circuitgraph.errors import CircuitGraphError  # noqa: E402
from dictionaries.errors import DictionaryError  # noqa: E402

COMMANDS = (tasks_cmd, train_model_cmd, dicts_cmd, trace_cmd, graph_cmd, qk_cmd, supernodes_cmd, demo_cmd)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (sub-commands registered by their modules)."""
    parser = argparse.ArgumentParser(prog="circuitgraph", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import torch

    try:
        if args.threads is not None and args.threads < 0:
            raise CircuitGraphError(f"--threads {args.threads}: use a positive number (or 0 for torch's choice)")
        if args.threads:
            torch.set_num_threads(args.threads)
        return int(args.func(args) or 0)
    except (CircuitGraphError, DictionaryError) as err:
        print(f"circuitgraph {args.command}: error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"circuitgraph {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # a setting a config dataclass refused (its message names the setting and the fix)
        print(f"circuitgraph {args.command}: error: {err}", file=sys.stderr)
        return 2
