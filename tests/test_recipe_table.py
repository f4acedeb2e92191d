"""docs/recipe.md, the card statement by statement, is checked against the code: every test it
names exists, every `key = value` is the epsilon config's, every code name is in the file it is
said to be in, and a row without a test says why the statement is not reproduced."""
from __future__ import annotations

import re

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

from tests.helpers import REPO
from trainers.lokr.config import flatten, load_config

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


def rows() -> list[list[str]]:
    """The cells of every table row of docs/recipe.md but the header and rule rows."""
    out = []
    for line in (REPO / "docs" / "recipe.md").read_text().splitlines():
        if not line.startswith("| ") or line.startswith(("| card statement", "|---")):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        out.append(cells)
    return out


def test_every_row_has_a_test_or_a_reason():
    table = rows()
    assert len(table) >= 35
    for statement, _, _, test in table:
        refs = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", test)
        assert refs or test.startswith("not reproduced"), statement
        for path, name in refs:
            assert re.search(rf"^def {name}\(", (REPO / path).read_text(), re.M), f"{path}::{name}"


def test_config_values_are_the_epsilon_config():
    epsilon = flatten(load_config("epsilon"))
    checked = 0
    for statement, config, _, _ in rows():
        for key, value in re.findall(r"`([a-z_]+\.[\w.]+) = ([^`]+)`", config):
            assert epsilon[key] == tomllib.loads(f"v = {value}")["v"], (statement, key)
            checked += 1
    assert checked >= 25


def test_code_names_are_where_the_table_says():
    for statement, _, code, _ in rows():
        path = None
        for token in re.findall(r"`([^`]+)`", code):
            if token.endswith(".py") or token.endswith("/"):
                path = REPO / token
                assert path.exists(), (statement, token)
            elif path is not None and path.is_file() and IDENTIFIER.fullmatch(token):
                assert token.split(".")[-1] in path.read_text(), (statement, token)
