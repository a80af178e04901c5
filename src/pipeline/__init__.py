"""analysis-pipeline: long analysis jobs, phase by phase, with every step in SQL."""

from pipeline.orchestrator import (
    Executor,
    PhaseFn,
    Registry,
    RegistryError,
    RunCancelled,
    RunContext,
    load_registry,
    phase,
    start_run,
    validate_registry,
)
from pipeline.pipelines import Pipeline, load_pipelines
from pipeline.runs import Run, RunStatus

__all__ = [
    "Executor",
    "PhaseFn",
    "Pipeline",
    "Registry",
    "RegistryError",
    "Run",
    "RunCancelled",
    "RunContext",
    "RunStatus",
    "load_pipelines",
    "load_registry",
    "phase",
    "start_run",
    "validate_registry",
]
