"""Hypothesis-generated bad recipes never give a traceback: exit 2 and one line naming where.

Each example starts from a real recipe (the bundled default or the tiny test recipe), applies
one or more mutations (any key at any depth replaced by a value of any type: unicode, huge or
negative numbers, inf/nan, dates, nested tables; random keys inserted; keys deleted; a broken
``extends``; the text itself cut or spliced) and runs ``convnet show`` on it through the real
CLI entry point. Anything but exit 0 (still a valid recipe) or exit 2 with one error line
naming the file and the place, fails. The ledger counts the recipes tried.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import tomli_w
from faultkit import TINY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convnet.core.cli import main

ROOT = Path(__file__).resolve().parents[2]
BASES = {
    "alexnet-digits": tomllib.loads((ROOT / "recipes" / "alexnet-digits.toml").read_text()),
    "tiny": tomllib.loads(TINY.read_text()),
}
WHERE = re.compile(
    r"\b(model|data|train|parallel|evaluate|seed|name|description|extends)\b|\(top level\)|"
    r"not valid TOML|cannot read recipe"
)

evil_scalars = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, -(2**63), 2**63, 10**30, 2**64 + 1]),
    st.floats(),
    st.sampled_from([1e308, -1e308, 5e-324]),
    st.text(max_size=20),
    st.sampled_from(["", "☃", "𝕮𝖔𝖓𝖛", "\u0000", "../../etc/passwd", "conv", "relu"]),
    st.booleans(),
    st.dates(),
    st.datetimes(),
    st.times(),
)
evil_values = st.recursive(
    evil_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(min_size=1, max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key and index of a parsed TOML document, at any depth."""
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            out.append((*prefix, k))
            out += paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.append((*prefix, i))
            out += paths(v, (*prefix, i))
    return out


def tables(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if isinstance(node, dict) else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += tables(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += tables(v, (*prefix, i))
    return out


def get(doc: Any, path: tuple) -> Any:
    for p in path:
        doc = doc[p]
    return doc


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, list[str]]:
    """(TOML text, the mutations made)."""
    import copy

    base = draw(st.sampled_from(sorted(BASES)))
    doc = copy.deepcopy(BASES[base])
    done = [f"from {base}"]
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["replace", "replace", "insert", "delete", "extends"]))
        if kind == "replace" and paths(doc):
            path = draw(st.sampled_from(paths(doc)))
            get(doc, path[:-1])[path[-1]] = draw(evil_values)
        elif kind == "insert":
            path = draw(st.sampled_from(tables(doc)))
            get(doc, path)[draw(st.text(min_size=1, max_size=10))] = draw(evil_values)
        elif kind == "delete" and paths(doc):
            path = draw(st.sampled_from(paths(doc)))
            del get(doc, path[:-1])[path[-1]]
        elif kind == "extends":
            doc["extends"] = draw(
                st.one_of(st.sampled_from(["bad.toml", "alexnet-digit", "/nonexistent/x.toml"]), evil_values)
            )
        else:
            continue
        done.append(f"{kind} {path if kind != 'extends' else doc['extends']!r}"[:80])
    text = tomli_w.dumps(doc)
    if draw(st.integers(0, 4)) == 0:  # also break the text itself now and then
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(max_size=10)) + text[at + draw(st.integers(0, 20)) :]
        done.append(f"spliced text at {at}")
    return text, done


@settings(
    max_examples=settings.default.max_examples * 5,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)  # capsys is drained each example
@given(case=mutated())
def test_generated_bad_recipes_exit_2_with_one_line(tmp_path_factory, capsys, ledger, case) -> None:
    text, done = case
    path = tmp_path_factory.mktemp("bad") / "bad.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    code = main(["show", str(path)])  # any exception escaping here is the traceback a user would see
    out, err = capsys.readouterr()
    if code == 0:
        ledger.record("bad recipe (hypothesis-generated TOML)", "still a valid recipe: exit 0, printed")
        assert tomllib.loads(out)
        return
    assert code == 2, (done, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convnet: error: "), (done, err)
    assert str(path) in lines[0] or "bad.toml" in lines[0] or "extends" in lines[0], (done, err)
    assert WHERE.search(lines[0]), (done, err)
    ledger.record("bad recipe (hypothesis-generated TOML)", "exit 2, one line naming the file and the place")


def test_a_recipe_that_extends_itself(tmp_path: Path, capsys, ledger) -> None:
    path = tmp_path / "loop.toml"
    path.write_text('extends = "loop.toml"\nseed = 1\n', encoding="utf-8")
    assert main(["show", str(path)]) == 2
    assert "more than 16 levels (a cycle?)" in capsys.readouterr().err
    ledger.record("recipe that extends itself", "exit 2, names the cycle")


def test_an_unreadable_recipe_file(tmp_path: Path, capsys, ledger) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('description = "caf\xe9"\n'.encode("latin-1"))
    assert main(["show", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "cannot read recipe" in err
    ledger.record("recipe file that is not UTF-8", "exit 2, names the file")
