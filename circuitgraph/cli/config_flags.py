"""Command-line flags generated from config dataclasses, so flags and configs never drift apart."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import types
from collections.abc import Mapping, Sequence
from typing import Any, Union, get_args, get_origin, get_type_hints

from dictionaries.config import flat_fields, from_flat


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (``field: T = x`` then ``\"\"\"doc\"\"\"``)."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for prev, node in zip(body, body[1:], strict=False):
        if (isinstance(prev, ast.AnnAssign) and isinstance(prev.target, ast.Name)
                and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def int_with_suffix(text: str) -> int:
    """Parse ``2M``, ``500k``, ``1.5G`` or a plain integer."""
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}
    t = text.strip().lower().replace("_", "")
    try:
        if t and t[-1] in scale:
            return int(float(t[:-1]) * scale[t[-1]])
        return int(t)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer (suffixes k, M, G allowed)") from err


def add_dataclass_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, prefix: str = "",
                        skip: tuple[str, ...] = (), rename: Mapping[str, str] | None = None,
                        aliases: Mapping[str, Sequence[str]] | None = None) -> list[str]:
    """Add one ``--flat-name`` flag per leaf field of a (possibly nested) config dataclass, typed and
    documented from the class (flat names: :func:`dictionaries.config.flat_fields`). ``rename`` maps
    a flat name to the name its flag uses (two configs sharing a command, e.g. ``max_feature_nodes``
    -> ``prompt_max_feature_nodes``); ``aliases`` adds older spellings (``acdc_tau`` -> ``--tau``).
    Returns the flat names that got a flag."""
    rename, aliases = rename or {}, aliases or {}
    added = []
    for name, (_, f, owner) in flat_fields(cls).items():
        if name in skip:
            continue
        added.append(name)
        dest = prefix + rename.get(name, name)
        flags = ["--" + dest.replace("_", "-"), *aliases.get(name, ())]
        hint = get_type_hints(owner)[f.name]
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = f"{_field_docs(owner).get(f.name, '')} (default: {default})"
        if hint is bool:
            parser.add_argument(*flags, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif get_origin(hint) is tuple:
            inner = get_args(hint)[0]
            parser.add_argument(*flags, dest=dest, type=inner, nargs=len(get_args(hint)), default=None, help=help_text)
        else:
            if get_origin(hint) in (Union, types.UnionType):  # X | None: the X
                hint = next(a for a in get_args(hint) if a is not type(None))
            choices = get_args(hint) if str(get_origin(hint)).endswith("Literal") else None
            kind = type(choices[0]) if choices else (hint if hint in (int, float, str) else str)
            if kind is int:
                kind = int_with_suffix
            parser.add_argument(*flags, dest=dest, type=kind, choices=choices, default=None, help=help_text)
    return added


def dataclass_from_flags(cls: type, args: argparse.Namespace, prefix: str = "", rename: Mapping[str, str] | None = None,
                         **overrides: Any) -> Any:
    """Build ``cls`` (nested configs included) from parsed flags; unset flags keep the defaults.
    ``rename``: as given to :func:`add_dataclass_flags`."""
    rename = rename or {}
    values = {}
    for name in flat_fields(cls):
        value = getattr(args, prefix + rename.get(name, name), None)
        if value is not None:
            values[name] = tuple(value) if isinstance(value, list) else value
    values.update(overrides)
    return from_flat(cls, values)


def given_flags(args: argparse.Namespace, names: Sequence[str]) -> list[str]:
    """The flags among ``names`` (dest names) the user set, spelled as flags; unset flags are ``None``
    (their defaults are filled in after the check, so a flag a mode ignores can be refused)."""
    return ["--" + n.replace("_", "-") for n in names if getattr(args, n, None) is not None]
