"""YAML numbers as a YAML 1.2 reader gives them: the spec's own example and ruamel.yaml (a 1.2 reader)."""
import math

import pytest

from dml_core import yaml12

# YAML 1.2.2, example 10.9 "Core Tag Resolution" (https://yaml.org/spec/1.2.2/#1032-tag-resolution)
SPEC_EXAMPLE = """
A null: null
Also a null: # Empty
Not a null: ""
Booleans: [ true, True, false, FALSE ]
Integers: [ 0, 0o7, 0x3A, -19 ]
Floats: [ 0., -0.0, .5, +12e03, -2E+05 ]
Also floats: [ .inf, -.Inf, +.INF, .NAN ]
"""

FORMS = ["1e-3", "1E5", "+1.5", ".5", "5.", "1.e3", ".5e-2", "1.5e+3", "1.0e-06", "-.inf", ".NaN", "123", "-7",
         "+7", "017", "0o17", "0x1f", "1_000", "1_000.5", "0b101", "-0x1f", "1:30", "e3", "1e", "0o8", "12.5.3",
         "2001-12-14", "~"]  # numbers only: `yes` stays a boolean, as PyYAML reads it


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return type(a) is type(b) and a == b


def test_the_specs_core_schema_example():
    got = yaml12.load(SPEC_EXAMPLE)
    assert got["A null"] is None and got["Also a null"] is None and got["Not a null"] == ""
    assert got["Booleans"] == [True, True, False, False]
    assert [(type(v), v) for v in got["Integers"]] == [(int, 0), (int, 7), (int, 58), (int, -19)]
    assert [(type(v), v) for v in got["Floats"]] == [(float, 0.0), (float, -0.0), (float, 0.5),
                                                     (float, 12000.0), (float, -200000.0)]
    assert got["Also floats"][:3] == [math.inf, -math.inf, math.inf] and math.isnan(got["Also floats"][3])


@pytest.mark.parametrize("form", FORMS)
def test_numbers_as_a_yaml_12_reader_reads_them(form):
    ruamel = pytest.importorskip("ruamel.yaml")
    expected = ruamel.YAML(typ="safe", pure=True).load(f"v: {form}")["v"]
    got = yaml12.load(f"v: {form}")["v"]
    assert same(got, expected), (form, got, expected)
