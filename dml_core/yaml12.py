"""YAML loading with the numbers of the YAML 1.2 core schema, for every YAML file the project reads.

PyYAML follows YAML 1.1, which reads `1e-3` as a string (a float there needs a dot). The 1.2 core schema
(https://yaml.org/spec/1.2.2/#1032-tag-resolution) reads `1e-3`, `1E5`, `+1.5`, `.5`, `5.`, `.inf`, `.nan`
as floats, `017` as the decimal 17 and `0o17`, `0x1f` as ints, and `1:30` as a string. As ruamel.yaml (a
1.2 reader) does, `1_000`, `0b101` and signed `-0x1f` stay numbers, as they were with PyYAML.
Booleans and nulls stay as PyYAML reads them.
"""
from __future__ import annotations

import re

import yaml

INT_TAG, FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
INT_12 = re.compile(r"^[-+]?(?:[0-9][0-9_]*|0b_*[01][01_]*|0o_*[0-7][0-7_]*|0x_*[0-9a-fA-F][0-9a-fA-F_]*)$")
FLOAT_12 = re.compile(r"^(?:[-+]?(?:\.[0-9][0-9_]*|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?"
                      r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")


class Loader(yaml.SafeLoader):
    """`yaml.SafeLoader` with the YAML 1.2 core schema's int and float resolution."""


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    sign = -1 if text.startswith("-") else 1
    digits = text.lstrip("+-")
    base = {"0b": 2, "0o": 8, "0x": 16}.get(digits[:2])
    return sign * (int(digits[2:], base) if base else int(digits, 10))  # `017` is 17 (YAML 1.1: octal 15)


Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (INT_TAG, FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
# int before float: every 1.2 int also matches the float pattern
Loader.add_implicit_resolver(INT_TAG, INT_12, list("-+0123456789"))
Loader.add_implicit_resolver(FLOAT_TAG, FLOAT_12, list("-+.0123456789"))
Loader.add_constructor(INT_TAG, _construct_int)


def load(text: str):
    """Parse one YAML document (raises `yaml.YAMLError` on bad syntax)."""
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass
