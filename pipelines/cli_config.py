"""Command-line parsers generated from config dataclasses.

Each field of a config becomes a flag ``--field-name``: its type comes from the annotation, its default
from the dataclass and its help from the class docstring's Google-style ``Attributes:`` section, so a
setting is documented once, where it is declared (an undocumented field is an error, not a bare flag).
Parsed values reach the job as the dataclass itself, whose ``__post_init__`` validates them.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import textwrap
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

_ENTRY = re.compile(r"(\w+(?:\s*,\s*\w+)*)\s*:\s*(.*)")
_ROLE = re.compile(r":\w+:`~?\.?([^`]+)`")  # :data:`POLICIES`, :mod:`.evolve_shared`


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand.

    Attributes:
        name: ``"demo"``, or ``"GROUP NAME"`` (e.g. ``"bench overhead"``) for a command of a nested group.
        config: the config dataclass its flags are generated from.
        run: the job, called with the config and the command line (None: ``sys.argv``).
        help: one line for the command list.
        description: the command's own ``--help`` text.
        args: argparse settings per field, over the generated ones: ``choices``, ``required``,
            ``flags`` (other option strings), ``positional=True``; one with ``type`` or ``action``
            replaces what the annotation would give.
    """

    name: str
    config: type
    run: Callable[[Any, list[str] | None], object]
    help: str
    description: str
    args: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults; wraps each line of a description on its own, so deliberate line breaks stay."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
                         for line in text.splitlines())


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> description, from the docstring's ``Attributes:`` section (``a, b: text`` documents
    both), reST markup stripped and ``%`` escaped for argparse."""
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    if "Attributes:" not in lines:
        return {}
    entries: list[tuple[list[str], list[str]]] = []
    indent = None
    for line in lines[lines.index("Attributes:") + 1:]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if depth == 0:  # the section ends where the text returns to the margin
            break
        indent = depth if indent is None else indent
        entry = _ENTRY.fullmatch(line.strip()) if depth == indent else None
        if entry:
            entries.append(([n.strip() for n in entry[1].split(",")], [entry[2]]))
        elif entries:
            entries[-1][1].append(line.strip())
    return {name: _plain(" ".join(parts)) for names, parts in entries for name in names}


def _plain(text: str) -> str:
    return _ROLE.sub(r"\1", text).replace("``", "").replace("%", "%%").removesuffix(".")


def _or_none(kind: type) -> Callable[[str], Any]:
    """``kind``, or None for the word ``none`` (an optional setting with a non-None default can be
    switched off)."""

    def parse(text: str) -> Any:
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


class _TupleAction(argparse.Action):
    """Stores the values of a ``nargs`` flag as a tuple, for ``tuple[X, ...]`` fields."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, tuple(values))


def _scalar(kind: Any) -> dict[str, Any] | None:
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        return {"type": type(choices[0]), "choices": choices}
    return {"type": kind} if kind in (int, float, str) else None


def annotation_kwargs(annotation: Any, default: Any = None) -> dict[str, Any]:
    """argparse settings for a field's type: a scalar, ``X | None``, ``bool`` (``--x/--no-x``),
    ``Literal[...]`` (choices) or a list, tuple or sequence of scalars (``nargs="+"``). An optional
    number, or an optional string whose ``default`` is not None, reads the word ``none`` as None."""
    args = typing.get_args(annotation)
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args
    kind = next(a for a in args if a is not type(None)) if optional and len(args) == 2 else annotation
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    if (scalar := _scalar(kind)) is not None:
        if optional and (kind in (int, float) or (kind is str and default is not None)):
            scalar["type"] = _or_none(kind)
        return scalar
    origin, items = typing.get_origin(kind), typing.get_args(kind)
    if origin is tuple and len(items) == 2 and items[1] is Ellipsis:
        items = items[:1]
    if origin in (list, tuple, Sequence) and len(items) == 1 and (scalar := _scalar(items[0])):
        return {**scalar, "nargs": "+", **({"action": _TupleAction} if origin is tuple else {})}
    raise TypeError(f"no command-line form for {annotation!r}; give a type in the command's args")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type,
                         overrides: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """One argument per field of the dataclass ``cls``; ``overrides`` as in :attr:`Command.args`."""
    overrides = overrides or {}
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    if unknown := sorted(set(overrides) - names):
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}")
    for f in dataclasses.fields(cls):
        if not docs.get(f.name):
            raise ValueError(f"{cls.__name__}.{f.name} is not documented in its docstring's Attributes:")
        extra = dict(overrides.get(f.name, {}))
        positional, flags = extra.pop("positional", False), extra.pop("flags", None)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kwargs = {} if "type" in extra or "action" in extra else annotation_kwargs(hints[f.name], default)
        kwargs.update(help=docs[f.name], **extra)
        if positional:
            if default is not dataclasses.MISSING:
                kwargs.update(nargs=kwargs.get("nargs", "?"), default=default)
            parser.add_argument(f.name, metavar=f.name.upper(), **kwargs)
            continue
        if default is dataclasses.MISSING or kwargs.get("required"):
            kwargs.update(required=True, default=argparse.SUPPRESS)  # no default to show
        else:
            kwargs.setdefault("default", default)
        parser.add_argument(*(flags or ["--" + f.name.replace("_", "-")]), dest=f.name, **kwargs)


def config_from_args(parser: argparse.ArgumentParser, cls: type, args: argparse.Namespace) -> Any:
    """``cls`` built from the parsed fields; its ValueError becomes a usage error (exit code 2)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    try:
        return cls(**values)
    except ValueError as error:
        parser.error(str(error))


def build_parser(prog: str, description: str, commands: Sequence[Command],
                 groups: Mapping[str, tuple[str, str]]) -> argparse.ArgumentParser:
    """A parser with one subcommand per :class:`Command`; ``groups`` gives each nested group's help and
    description. Parsing sets ``_command`` (the :class:`Command`) and ``_parser`` (its parser)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    top = parser.add_subparsers(metavar="COMMAND", required=True)
    nested: dict[str, argparse._SubParsersAction] = {}
    for command in commands:
        *group, name = command.name.split()
        sub = top
        if group:
            if group[0] not in nested:
                group_help, group_description = groups[group[0]]
                p = top.add_parser(group[0], help=group_help, description=group_description,
                                   formatter_class=HelpFormatter)
                nested[group[0]] = p.add_subparsers(metavar="COMMAND", required=True)
            sub = nested[group[0]]
        p = sub.add_parser(name, help=command.help, description=command.description,
                           formatter_class=HelpFormatter)
        add_config_arguments(p, command.config, command.args)
        p.set_defaults(_command=command, _parser=p)
    return parser
