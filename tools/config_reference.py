#!/usr/bin/env python
"""Write docs/CONFIG_REFERENCE.md from the config dataclasses.

    python tools/config_reference.py [--out docs/CONFIG_REFERENCE.md] [--check]

Every section of `Config` (ssl_ema/config_schema.py) and every section a method registers
(`ssl_ema.methods.registry.sections()`): each key with its type, default, valid choices (from
`Literal` annotations and `ssl_ema.config_checks.CHOICES`) and help text (the comments above and
beside the field in the source). ``--check`` writes nothing and exits 1 when the file differs.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import sys
import textwrap
import tokenize
import typing
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "CONFIG_REFERENCE.md"
COMMAND = "python tools/config_reference.py"


@dataclasses.dataclass(frozen=True)
class Key:
    name: str
    type: str
    default: str
    choices: tuple[str, ...]
    help: str


def _comments(lines: list[str]) -> dict[int, str]:
    """1-based line number -> the comment text on that line (without '#')."""
    tokens = tokenize.generate_tokens(io.StringIO("".join(lines)).readline)
    return {t.start[0]: t.string.lstrip("#").strip() for t in tokens
            if t.type == tokenize.COMMENT}


def _field_help(cls: type) -> tuple[str, dict[str, str]]:
    """(the class docstring, field -> its comments: the block right above it, then the one on its
    own lines), read from the source."""
    lines, _ = inspect.getsourcelines(cls)
    source = textwrap.dedent("".join(lines))
    tree = ast.parse(source).body[0]
    assert isinstance(tree, ast.ClassDef)
    src_lines = source.splitlines(keepends=True)
    comments = _comments(src_lines)
    helps: dict[str, str] = {}
    for node in tree.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above: list[str] = []
        line = node.lineno - 1
        while line >= 1 and src_lines[line - 1].strip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        end = node.end_lineno or node.lineno
        beside = [comments[n] for n in range(node.lineno, end + 1) if n in comments]
        helps[node.target.id] = " ".join(above + beside)
    return ast.get_docstring(tree) or "", helps


def _plain(value: Any) -> str:
    """A default as it would be written in a recipe (YAML flow style)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_plain(v) for v in value) + "]"
    return repr(value)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def section_keys(cls: type, prefix: str) -> tuple[str, list[Key]]:
    """(docstring, keys) of one section dataclass; ``prefix`` is its recipe key, e.g. 'data'."""
    from ssl_ema.config_checks import CHOICES

    doc, helps = _field_help(cls)
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        choices: tuple[str, ...] = ()
        if typing.get_origin(tp) is Literal:
            choices = tuple(str(a) for a in typing.get_args(tp))
        choices = CHOICES.get(f"{prefix}.{f.name}", choices)
        type_text = f.type if isinstance(f.type, str) else getattr(tp, "__name__", str(tp))
        if dataclasses.is_dataclass(tp):  # a section of its own, listed after this one
            keys.append(Key(f.name, "section", "{...}", (),
                            f"its own keys: see `{prefix}.{f.name}` below"))
            continue
        if choices:  # a Literal's values are in the choices column
            type_text = type(typing.get_args(tp)[0]).__name__ if typing.get_args(tp) else "str"
        keys.append(Key(f.name, type_text, _plain(_default(f)), choices, helps.get(f.name, "")))
    return doc, keys


def all_sections() -> dict[str, tuple[type, str]]:
    """Recipe key -> (dataclass, where it is defined): Config's own sections, then the methods'."""
    from ssl_ema.config_schema import Config
    from ssl_ema.methods.registry import METHODS, sections

    hints = typing.get_type_hints(Config)
    out: dict[str, tuple[type, str]] = {}
    for f in dataclasses.fields(Config):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(_with_subsections(f.name, hints[f.name]))
    owner = {s.key: s.name for s in METHODS.values()}
    for key, cls in sections().items():
        out[key] = (cls, f"method `{owner[key]}`, `{cls.__module__.replace('.', '/')}.py`")
    return out


def _with_subsections(key: str, cls: type) -> dict[str, tuple[type, str]]:
    """``key`` and, after it, every section nested in it (``ema.posthoc``)."""
    out = {key: (cls, "`ssl_ema/config_schema.py`")}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(_with_subsections(f"{key}.{f.name}", hints[f.name]))
    return out


def _cell(text: str) -> str:
    """Table-cell text: pipes, asterisks and angle brackets shown as themselves."""
    for raw, shown in (("|", "\\|"), ("*", "\\*"), ("<", "&lt;"), (">", "&gt;")):
        text = text.replace(raw, shown)
    return text.replace("\n", " ")


def render() -> str:
    """The whole of docs/CONFIG_REFERENCE.md."""
    out = ["# Configuration reference", "",
           f"Generated by `{COMMAND}` from the config dataclasses; do not edit by hand "
           "(`tests/test_config_reference.py` fails when this file is stale). What the keys "
           "mean together: [CONFIGURATION.md](CONFIGURATION.md).", ""]
    for key, (cls, where) in all_sections().items():
        doc, keys = section_keys(cls, key)
        out += [f"## `{key}`", "", f"`{cls.__name__}` ({where}).", ""]
        if doc:
            out += [" ".join(doc.split()), ""]
        out += ["| key | type | default | choices | help |", "|---|---|---|---|---|"]
        for k in keys:
            choices = " \\| ".join(f"`{c}`" for c in k.choices)
            out.append(f"| `{key}.{k.name}` | `{k.type}` | `{k.default}` | {choices} | "
                       f"{_cell(k.help)} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the file is not what this tool would write")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not args.out.is_file() or args.out.read_text() != text:
            print(f"error: {args.out} is stale; regenerate it with: {COMMAND}", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
