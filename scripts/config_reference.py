"""The config reference table in README.md, generated from `dml_core/config.py` (every field, its default,
the comment that documents it), so the two cannot drift apart.

    python scripts/config_reference.py          # rewrite the table in README.md
    python scripts/config_reference.py --check  # exit 1 if README.md is out of date (the tests run this)
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import sys
import typing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dml_core import config as config_module  # noqa: E402

README = os.path.join(ROOT, "README.md")
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
FIELD = re.compile(r"^\s{4}(\w+):[^#]*?(?:#\s*(.*))?$")


def field_comments(cls) -> dict[str, str]:
    """Each field's documentation: its trailing comment, after the comment lines just above it."""
    out, above = {}, []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        match = FIELD.match(line)
        if match:
            out[match.group(1)] = " ".join(above + ([match.group(2)] if match.group(2) else []))
        above = []
    return out


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _doc(cls) -> str:
    """A class's own docstring (not the signature dataclasses writes in its place)."""
    doc = (cls.__doc__ or "").strip()
    return "" if doc.startswith(cls.__name__ + "(") else " ".join(doc.split())


def _section(tp):
    """The dataclass a field holds (directly or as Optional[...]), else None."""
    for t in (tp, *typing.get_args(tp)):
        if dataclasses.is_dataclass(t):
            return t
    return None


def rows(cls=config_module.Config, prefix: str = "") -> list[tuple[str, str, str]]:
    hints, comments, out = typing.get_type_hints(cls), field_comments(cls), []
    for f in dataclasses.fields(cls):
        section = _section(hints[f.name])
        if section is not None and f.name != "runs":
            if _default(f) is None:  # an optional section: off unless given
                out.append((prefix + f.name, "null", comments.get(f.name) or _doc(section)))
            out += rows(section, prefix + f.name + ".")
        else:
            value = _default(f)
            value = [dataclasses.asdict(v) for v in value] if f.name == "runs" else value
            out.append((prefix + f.name, json.dumps(value), comments.get(f.name, "")))
    return out


def table() -> str:
    lines = ["| field | default | what it does |", "|---|---|---|"]
    lines += [f"| `{name}` | `{default}` | {doc.replace('|', '/')} |" for name, default, doc in rows()]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check that README.md is up to date")
    args = ap.parse_args(argv)
    text = open(README).read()
    if START not in text or END not in text:
        print(f"README.md has no {START} ... {END} block", file=sys.stderr)
        return 1
    head, rest = text.split(START, 1)
    new = head + START + "\n" + table() + "\n" + END + rest.split(END, 1)[1]
    if args.check:
        if new != text:
            print("README.md's config reference is out of date: run python scripts/config_reference.py",
                  file=sys.stderr)
            return 1
        return 0
    with open(README, "w") as f:
        f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
