"""Pipelines: a named registry of phases with an optional params model, and loading them.

``PIPELINE_PHASES`` names one or more ``module:attribute``, comma-separated;
each attribute is a plain registry (a list of ``(num, label, callable)``,
which becomes a pipeline named after the attribute, lower-cased), a
:class:`Pipeline`, or a list of them. Names are unique, and everything is
checked at load, before any run starts (DESIGN.md, "Pipelines and typed
parameters").

The default ``pipeline.example:PHASES`` is a plain registry, so it loads as
the pipeline ``"phases"``: that is also the name migration 0004 gives every
run created before pipelines existed, so those runs keep running, resuming and
listing under the default configuration.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pydantic
from sqlalchemy.engine import Connection

if TYPE_CHECKING:
    from pipeline.orchestrator import RunContext

PhaseFn = Callable[[Connection, "RunContext"], object]
Phase = tuple[int, str, PhaseFn]
Registry = Sequence[Phase]

MAX_LABEL_LENGTH = 200  # analysis_runs.phase_label and run_phases.label
MAX_DESCRIPTION_LENGTH = 500
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
# The name of a plain registry handed over without one (tests, start_run), and
# of every run created before migration 0004: what pipeline.example:PHASES loads as.
DEFAULT_NAME = "phases"


class RegistryError(ValueError):
    """A registry that would make runs lie about their phases."""


class UnknownPipeline(LookupError):
    """No pipeline of that name here, or none named where several are; the message lists them."""


def choose_pipeline(pipelines: Mapping[str, Pipeline], name: object) -> Pipeline:
    """The pipeline called ``name`` (None: the only one), for every door that names one."""
    known = ", ".join(sorted(pipelines))
    if name is None:
        if len(pipelines) == 1:
            return next(iter(pipelines.values()))
        raise UnknownPipeline(f"name the pipeline: this service has several ({known})")
    found = pipelines.get(name) if isinstance(name, str) else None
    if found is None:
        shown = repr(name[:64]) if isinstance(name, str) else type(name).__name__
        raise UnknownPipeline(f"no pipeline named {shown}; known: {known}")
    return found


def validate_registry(phases: object) -> list[Phase]:
    """Check the registry's shape before any run starts, and return it as a list."""
    if isinstance(phases, str | bytes) or not isinstance(phases, Sequence):
        kind = type(phases).__name__
        raise RegistryError(
            f"a registry is a list of (phase_num, phase_label, callable), not {kind}"
        )
    if not phases:
        raise RegistryError("the registry has no phases")
    checked: list[Phase] = []
    for index, entry in enumerate(phases, start=1):
        if not isinstance(entry, tuple) or len(entry) != 3:
            raise RegistryError(f"entry {index} is not a (phase_num, phase_label, callable) tuple")
        num, label, fn = entry
        if isinstance(num, bool) or not isinstance(num, int):
            raise RegistryError(f"entry {index}: phase number {num!r} is not an integer")
        if num != index:
            problem = "repeats" if any(n == num for n, _, _ in checked) else "is out of order"
            raise RegistryError(
                f"entry {index}: phase number {num} {problem}; "
                f"phases must be numbered 1..n with no gaps or repeats (expected {index})"
            )
        if not isinstance(label, str) or not label.strip():
            raise RegistryError(f"phase {num}: the label must be a non-empty string")
        if len(label) > MAX_LABEL_LENGTH:
            raise RegistryError(
                f"phase {num}: the label is longer than {MAX_LABEL_LENGTH} characters"
            )
        if not callable(fn):
            raise RegistryError(f"phase {num} ({label}): {fn!r} is not callable")
        checked.append((num, label, fn))
    return checked


@dataclass(frozen=True, slots=True, init=False)
class Pipeline:
    """A named registry, with an optional pydantic model its params must fit."""

    name: str
    phases: tuple[Phase, ...]
    params: type[pydantic.BaseModel] | None
    description: str = field(default="")

    def __init__(
        self,
        name: str,
        phases: Registry,
        params: type[pydantic.BaseModel] | None = None,
        description: str = "",
    ) -> None:
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise RegistryError(
                f"pipeline name {name!r} is not a slug ([a-z0-9][a-z0-9_-]{{0,63}})"
            )
        try:
            checked = validate_registry(phases)
        except RegistryError as exc:
            raise RegistryError(f"pipeline {name!r}: {exc}") from None
        if params is not None and not (
            isinstance(params, type) and issubclass(params, pydantic.BaseModel)
        ):
            raise RegistryError(f"pipeline {name!r}: params must be a pydantic BaseModel subclass")
        if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_LENGTH:
            raise RegistryError(
                f"pipeline {name!r}: the description must be text of at most "
                f"{MAX_DESCRIPTION_LENGTH} characters"
            )
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "phases", tuple(checked))
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "description", description)

    @property
    def labels(self) -> list[tuple[int, str]]:
        return [(num, label) for num, label, _ in self.phases]

    def params_schema(self) -> dict[str, Any] | None:
        """The params model's JSON Schema, or None without a model."""
        return None if self.params is None else self.params.model_json_schema()

    def check_params(self, params: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
        """The params as stored (validated JSON, defaults filled in) and the model instance.

        Raises :class:`pydantic.ValidationError`; without a model, the params
        are returned as they are, with None for the instance.
        """
        if self.params is None:
            return dict(params), None
        model = self.params.model_validate(dict(params))
        return model.model_dump(mode="json"), model

    def instance(self, params: Mapping[str, Any]) -> Any:
        """The model instance for stored params (None without a model, or if they no longer fit)."""
        if self.params is None:
            return None
        try:
            return self.params.model_validate(dict(params))
        except pydantic.ValidationError:
            return None


def field_errors(exc: pydantic.ValidationError) -> list[dict[str, Any]]:
    """Every field error in FastAPI's ``[{loc, msg, type}]`` form, under ``body.params``."""
    return [
        {"loc": ["body", "params", *error["loc"]], "msg": error["msg"], "type": error["type"]}
        for error in exc.errors(include_url=False, include_context=False, include_input=False)
    ]


def one_line(exc: pydantic.ValidationError) -> str:
    """The field errors on one line, for the CLI: ``params.limit: ...; params.x: ...``."""
    return "; ".join(
        ".".join(str(part) for part in error["loc"][1:]) + ": " + error["msg"]
        for error in field_errors(exc)
    )


def as_pipelines(source: Registry | Pipeline | Sequence[Pipeline]) -> list[Pipeline]:
    """A plain registry (named :data:`DEFAULT_NAME`), a pipeline or a list of them, checked."""
    if isinstance(source, Pipeline):
        return [source]
    if (
        isinstance(source, Sequence)
        and not isinstance(source, str | bytes)
        and source
        and all(isinstance(item, Pipeline) for item in source)
    ):
        found = [item for item in source if isinstance(item, Pipeline)]
        _check_unique(found, where="the pipelines given")
        return found
    return [Pipeline(DEFAULT_NAME, validate_registry(source))]


def _check_unique(found: Sequence[Pipeline], *, where: str) -> None:
    seen: set[str] = set()
    for item in found:
        if item.name in seen:
            raise RegistryError(f"two pipelines are named {item.name!r} in {where}")
        seen.add(item.name)


def _load_one(spec: str) -> list[Pipeline]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RegistryError(f"PIPELINE_PHASES must look like 'package.module:NAME', not {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or any error raised by the module's own code
        raise RegistryError(f"cannot import {module_name!r} for the registry: {exc}") from exc
    try:
        value = getattr(module, attr)
    except AttributeError:
        raise RegistryError(f"module {module_name!r} has no attribute {attr!r}") from None
    if isinstance(value, Pipeline):
        return [value]
    if (
        isinstance(value, Sequence)
        and not isinstance(value, str | bytes)
        and value
        and all(isinstance(item, Pipeline) for item in value)
    ):
        return [item for item in value if isinstance(item, Pipeline)]
    try:
        return [Pipeline(attr.lower(), validate_registry(value))]
    except RegistryError as exc:
        raise RegistryError(f"{spec}: {exc}") from None


def load_pipelines(spec: str) -> list[Pipeline]:
    """Import every ``module:attribute`` of ``PIPELINE_PHASES`` and check the lot."""
    entries = [part.strip() for part in spec.split(",")]
    if not any(entries):
        raise RegistryError("PIPELINE_PHASES names no registry")
    found: list[Pipeline] = []
    for entry in entries:
        if not entry:
            raise RegistryError(f"PIPELINE_PHASES has an empty entry: {spec!r}")
        found.extend(_load_one(entry))
    _check_unique(found, where=f"PIPELINE_PHASES={spec!r}")
    return found


def load_registry(spec: str) -> list[Phase]:
    """The phases of the one pipeline ``spec`` names (``PIPELINE_PHASES`` with one entry)."""
    found = load_pipelines(spec)
    if len(found) != 1:
        names = ", ".join(p.name for p in found)
        raise RegistryError(f"{spec!r} names several pipelines ({names}), not one registry")
    return list(found[0].phases)
