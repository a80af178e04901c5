"""The phase registry: its shape is checked before any run starts."""

from __future__ import annotations

import pytest

from pipeline.orchestrator import RegistryError, load_registry, validate_registry


def noop(conn, ctx):
    return None


def test_a_well_formed_registry_is_returned_in_order():
    """Ordered (num, label, callable) tuples pass unchanged."""
    registry = [(1, "Fetch", noop), (2, "Analyze", noop)]
    assert validate_registry(registry) == registry


@pytest.mark.parametrize(
    ("registry", "message"),
    [
        pytest.param([], "no phases", id="empty"),
        pytest.param([(1, "a", noop), (3, "c", noop)], "out of order", id="gap"),
        pytest.param([(1, "a", noop), (1, "b", noop)], "repeats", id="repeat"),
        pytest.param([(2, "a", noop)], "expected 1", id="not-from-one"),
        pytest.param([(1, "", noop)], "non-empty", id="empty-label"),
        pytest.param([(1, "   ", noop)], "non-empty", id="blank-label"),
        pytest.param([(1, None, noop)], "non-empty", id="label-not-str"),
        pytest.param([(1, "x" * 201, noop)], "longer than 200", id="label-too-long"),
        pytest.param([(1, "a", "not callable")], "not callable", id="non-callable"),
        pytest.param([(1, "a")], "tuple", id="short-tuple"),
        pytest.param([("1", "a", noop)], "not an integer", id="num-not-int"),
        pytest.param([(True, "a", noop)], "not an integer", id="num-bool"),
        pytest.param("abc", "not str", id="a-string"),
        pytest.param({1: noop}, "not dict", id="a-dict"),
    ],
)
def test_a_malformed_registry_is_rejected_with_a_clear_message(registry, message):
    """Gaps, repeats, empty labels and non-callables are refused, saying which entry."""
    with pytest.raises(RegistryError, match=message):
        validate_registry(registry)


def test_load_registry_imports_module_attribute():
    """PIPELINE_PHASES=module:NAME loads and validates that registry."""
    registry = load_registry("pipeline.example:PHASES")
    assert [num for num, _, _ in registry] == list(range(1, len(registry) + 1))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("pipeline.example", "package.module:NAME"),
        ("no.such.module:PHASES", "cannot import"),
        ("pipeline.example:NOPE", "no attribute"),
    ],
)
def test_load_registry_explains_a_bad_spec(spec, message):
    """A wrong PIPELINE_PHASES says what is wrong before any run starts."""
    with pytest.raises(RegistryError, match=message):
        load_registry(spec)
