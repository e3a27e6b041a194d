"""Fuzz: mutations of a valid tiny params file (deleted keys, wrong types, extreme values, typo
keys) end in ``mmgraph check`` exiting 0, or 2 with a message and no traceback (issue 14)."""

from __future__ import annotations

import copy

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mmgraph.cli import main
from tests.conftest import FUZZ, TINY1

BASE = yaml.safe_load(TINY1.read_text())


def _paths(node, prefix=()):
    """Every (container path, key) of the tree, lists included."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in items:
        yield prefix + (key,)
        yield from _paths(value, prefix + (key,))


PATHS = list(_paths(BASE))
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**20), max_value=10**20),
    st.sampled_from([0, -1, 1, 2**31, 10**9, 10**18, 0.5, -0.0, 1e308, float("inf"), float("nan")]),
    st.text(max_size=8), st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
MUTATION = st.tuples(st.sampled_from(["delete", "retype", "typo"]), st.sampled_from(PATHS), VALUES,
                     st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=3))


def _mutate(raw, mutation):
    kind, path, value, suffix = mutation
    *parents, last = path
    node = raw
    for key in parents:
        node = node[key]
    if kind == "delete":
        if isinstance(node, dict):
            del node[last]
        else:
            node.pop(last)
    elif kind == "retype":
        node[last] = value
    elif isinstance(node, dict):   # typo of a key
        node[str(last) + suffix] = node.pop(last)


@settings(FUZZ, max_examples=25)
@given(mutations=st.lists(MUTATION, min_size=1, max_size=3))
def test_mutated_params_exit_0_or_named_2(tmp_path, capsys, mutations):
    raw = copy.deepcopy(BASE)
    for mutation in mutations:
        try:
            _mutate(raw, mutation)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced the parent
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    code = main(["check", "--params", str(path)])
    err = capsys.readouterr().err
    assert code in (0, 2), err
    assert "Traceback" not in err
    if code == 2:
        assert err.startswith("mmgraph: error:") and str(path) in err
