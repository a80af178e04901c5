"""Settings, read once from the environment (``PIPELINE_*``).

One object serves the CLI, the API, the workers and Alembic's ``env.py``, so
that every entry point agrees on which database and which registry it uses.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_DATABASE_URL = "sqlite:///./pipeline.db"
DEFAULT_PHASES = "pipeline.example:PIPELINE"


class Settings(BaseSettings):
    """What DESIGN.md's configuration table promises, with its defaults."""

    model_config = SettingsConfigDict(env_prefix="PIPELINE_", extra="ignore")

    database_url: str = DEFAULT_DATABASE_URL
    phases: str = DEFAULT_PHASES
    max_concurrent_runs: int = Field(default=4, ge=1, le=256)
    api_token: str | None = None
    # A run on another host whose heartbeat is older than this is presumed lost.
    lease_seconds: float = Field(default=60.0, gt=0)
    # How often the owner of a run refreshes its heartbeat and sub-progress.
    heartbeat_seconds: float = Field(default=1.0, gt=0)
    # How often a server looks for runs whose runner died.
    sweep_seconds: float = Field(default=30.0, gt=0)
    # How long a writer waits for SQLite's lock before the request becomes a 503.
    busy_timeout_ms: int = Field(default=5000, ge=0)
    # "thread": the API process executes runs itself; "worker": it only queues
    # them, and `pipeline worker` processes execute them.
    executor: Literal["thread", "worker"] = "thread"
    # Queue a run whose runner was lost again instead of failing it.
    auto_resume: bool = False
    # How often an idle server or worker looks for queued runs.
    poll_seconds: float = Field(default=1.0, gt=0)
    # Delete finished runs older than this (e.g. "30d"); unset keeps them forever.
    retention: str | None = None
    # How often a server prunes, when retention is set.
    prune_seconds: float = Field(default=600.0, gt=0)
    # What one client can hold of the HTTP server (pipeline.serving): open
    # connections (beyond, new ones are closed and requests answered 503), how
    # long a connection may take to send its request head, how long an idle
    # keep-alive connection stays open.
    http_max_connections: int = Field(default=500, ge=1)
    http_header_timeout_seconds: float = Field(default=10.0, gt=0)
    http_keep_alive_seconds: int = Field(default=5, ge=1)
    # "text" for people, "json" for log collectors (one object per line).
    log_format: Literal["text", "json"] = "text"
    # The Host header values the app answers (DNS rebinding defence), comma-separated
    # in the environment; "*.example.com" matches its subdomains, "*" any host. Empty:
    # the loopback names plus the host the server was bound to (see pipeline.security).
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Open event streams (GET /runs/{id}/events) at once, overall and per client address.
    max_event_streams: int = Field(default=200, ge=1)
    max_streams_per_client: int = Field(default=20, ge=1)
    # Runs waiting in the queue beyond which POST /runs answers 429.
    max_queued_runs: int = Field(default=10_000, ge=1)

    @field_validator("api_token")
    @classmethod
    def _no_empty_token(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("PIPELINE_API_TOKEN is set but empty; unset it, or give a token")
        return value

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list | tuple):
            return [str(host).strip() for host in value if str(host).strip()]
        return value

    @field_validator("retention")
    @classmethod
    def _valid_retention(cls, value: str | None) -> str | None:
        if value is not None and value.strip():
            from pipeline.retention import parse_duration

            parse_duration(value)
            return value
        return None


def get_settings() -> Settings:
    """Read the environment now (not at import), so tests can set it per test."""
    return Settings()
