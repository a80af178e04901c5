"""Phase results and artifacts: what a run produced, as durable as its progress.

A phase's **result** is its return value; an **artifact** is something a
person looks at (markdown, a table, a chart) that a phase publishes with
``ctx.artifact(...)``. Both are checked and serialized when the phase hands
them over (the return, the call), held in memory, and written by the runner
with the phase's completion record, in the phase's own transaction
(``runs.finish_phase``). So they exist exactly when the phase committed: a
failed or cancelled attempt leaves none, a retried attempt starts clean, and
a later phase (in this process, or after a resume in another) reads
``ctx.results[num]`` from what was committed, never from an attempt that
rolled back.

Checked up front rather than at the database: a bad value raises at the call
(``ValueError``, in the phase, with a message that says what is wrong), and
no stored value can make a later read fail (no ``NaN``, bounded sizes, text
PostgreSQL accepts). Stored as the JSON text that was checked, and served as
it is.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline.compiled import Compiled, JsonRows
from pipeline.schema import run_artifacts as artifacts_t
from pipeline.schema import run_results as results_t

MAX_BYTES = 1024 * 1024  # a result, and each artifact, as JSON text
MAX_ROWS = 10_000  # of a table
MAX_POINTS = 10_000  # of a chart: x positions times series
MAX_TITLE = 200
KEY = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
Kind = Literal["markdown", "table", "chart"]
CHART_TYPES = ("bar", "line")
# Characters a stored title may not hold: NUL (PostgreSQL text refuses it) and
# the other control characters (a terminal would obey them).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _dumps(value: object) -> str:
    """Compact, ASCII (no raw NUL or odd code point reaches the database), no NaN."""
    return json.dumps(value, allow_nan=False, separators=(",", ":"))


def _too_large(text: str) -> bool:
    return len(text) > MAX_BYTES  # ASCII: one byte per character


# -- results -------------------------------------------------------------------


def serialize_result(value: object, *, phase_num: int) -> str | None:
    """A phase's return value as the JSON text to store (None stores nothing).

    Raises ``ValueError`` (the phase then fails, rolled back) for a value
    that is not JSON, holds NaN or Infinity, or is larger than 1 MiB.
    """
    if value is None:
        return None
    what = f"phase {phase_num} returned a result that"
    try:
        text = _dumps(value)
    except TypeError as exc:
        raise ValueError(f"{what} is not JSON-serializable ({exc})") from None
    except ValueError as exc:
        if "out of range float" in str(exc).lower():
            raise ValueError(f"{what} holds NaN or Infinity, which JSON cannot represent") from None
        raise ValueError(f"{what} is not JSON-serializable ({exc})") from None
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply to serialize") from None
    if _too_large(text):
        raise ValueError(
            f"{what} is {len(text):,} bytes as JSON; a result may be at most {MAX_BYTES:,} bytes"
        )
    return text


class Results(Mapping[int, Any]):
    """Earlier phases' results by phase number, read-only.

    Each read decodes the stored text afresh, so a phase that changes what it
    read changes nothing for a later phase: in this process, later phases see
    exactly what one in another process would load from the database.
    """

    def __init__(self, texts: Mapping[int, str] | None = None) -> None:
        self._texts: dict[int, str] = dict(texts or {})

    def __getitem__(self, num: int) -> Any:
        return json.loads(self._texts[num])

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._texts))

    def __len__(self) -> int:
        return len(self._texts)

    def __repr__(self) -> str:
        return f"Results(phases={list(self)})"

    def _add(self, num: int, text: str) -> None:
        self._texts[num] = text


# -- artifacts: shapes and validation --------------------------------------------


@dataclass(frozen=True, slots=True)
class Staged:
    """An artifact checked and serialized at the call, waiting for its phase to commit."""

    key: str
    kind: Kind
    title: str | None
    data: str


def _is_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return not isinstance(value, float) or math.isfinite(value)


def _is_scalar(value: object) -> bool:
    return value is None or isinstance(value, bool | str) or _is_number(value)


def _check_key(key: object) -> str:
    if not isinstance(key, str) or KEY.fullmatch(key) is None:
        raise ValueError(
            f"artifact key {key!r} is not a slug: lower-case letters, digits, '-' and '_', "
            "starting with a letter or digit, at most 64 characters"
        )
    return key


def _check_title(title: object, key: str) -> str | None:
    if title is None:
        return None
    if not isinstance(title, str) or not title.strip():
        raise ValueError(f"artifact {key!r}: the title must be a non-empty string or None")
    if len(title) > MAX_TITLE or _CONTROL.search(title):
        raise ValueError(
            f"artifact {key!r}: the title must be at most {MAX_TITLE} characters, "
            "without control characters"
        )
    return title


def _check_table(table: object, key: str) -> dict[str, Any]:
    what = f"artifact {key!r}: a table"
    if not isinstance(table, Mapping) or set(table) != {"columns", "rows"}:
        raise ValueError(f'{what} is {{"columns": [str, ...], "rows": [[scalar, ...], ...]}}')
    columns, rows = table["columns"], table["rows"]
    if not isinstance(columns, list) or not columns or not all(isinstance(c, str) for c in columns):
        raise ValueError(f"{what}'s columns must be a non-empty list of strings")
    if not isinstance(rows, list):
        raise ValueError(f"{what}'s rows must be a list of lists")
    if len(rows) > MAX_ROWS:
        raise ValueError(f"{what} has {len(rows):,} rows; at most {MAX_ROWS:,} are allowed")
    for index, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != len(columns):
            raise ValueError(
                f"{what}'s row {index} must be a list of {len(columns)} values, one per column"
            )
        for cell in row:
            if not _is_scalar(cell):
                raise ValueError(
                    f"{what}'s row {index} holds {cell!r}: a cell is a string, a finite number, "
                    "a boolean or null"
                )
    return {"columns": list(columns), "rows": [list(row) for row in rows]}


def _check_chart(chart: object, key: str) -> dict[str, Any]:
    what = f"artifact {key!r}: a chart"
    if not isinstance(chart, Mapping) or set(chart) != {"type", "x", "series"}:
        raise ValueError(
            f'{what} is {{"type": "bar" | "line", "x": [...], '
            '"series": [{"name": str, "values": [...]}, ...]}'
        )
    kind, xs, series = chart["type"], chart["x"], chart["series"]
    if kind not in CHART_TYPES:
        raise ValueError(f"{what}'s type must be 'bar' or 'line', not {kind!r}")
    if not isinstance(xs, list) or not all(isinstance(x, str) or _is_number(x) for x in xs):
        raise ValueError(f"{what}'s x must be a list of labels (strings) or finite numbers")
    if not isinstance(series, list) or not series:
        raise ValueError(f"{what} needs a non-empty list of series")
    if len(xs) * len(series) > MAX_POINTS:
        raise ValueError(
            f"{what} has {len(xs) * len(series):,} points (x positions times series); "
            f"at most {MAX_POINTS:,} are allowed"
        )
    checked = []
    for index, one in enumerate(series):
        if not isinstance(one, Mapping) or set(one) != {"name", "values"}:
            raise ValueError(f'{what}\'s series {index} must be {{"name": str, "values": [...]}}')
        name, values = one["name"], one["values"]
        if not isinstance(name, str):
            raise ValueError(f"{what}'s series {index} needs a name (a string)")
        if not isinstance(values, list) or len(values) != len(xs):
            raise ValueError(
                f"{what}'s series {name!r} must have {len(xs)} values, as many as x has"
            )
        if not all(v is None or _is_number(v) for v in values):
            raise ValueError(
                f"{what}'s series {name!r} holds a value that is not a finite number or null"
            )
        checked.append({"name": name, "values": list(values)})
    return {"type": kind, "x": list(xs), "series": checked}


def prepare(
    key: object,
    *,
    title: object = None,
    markdown: object = None,
    table: object = None,
    chart: object = None,
) -> Staged:
    """Check one artifact and serialize it; ``ValueError`` says what is wrong."""
    key = _check_key(key)
    given = [
        kind
        for kind, v in (("markdown", markdown), ("table", table), ("chart", chart))
        if v is not None
    ]
    if len(given) != 1:
        raise ValueError(
            f"artifact {key!r} needs exactly one of markdown=, table= or chart= "
            f"({'none' if not given else ' and '.join(given)} given)"
        )
    checked_title = _check_title(title, key)
    data: Any
    kind: Kind
    if markdown is not None:
        if not isinstance(markdown, str):
            raise ValueError(f"artifact {key!r}: markdown must be a string")
        kind, data = "markdown", markdown
    elif table is not None:
        kind, data = "table", _check_table(table, key)
    else:
        kind, data = "chart", _check_chart(chart, key)
    text = _dumps(data)
    if _too_large(text):
        raise ValueError(
            f"artifact {key!r} is {len(text):,} bytes as JSON; "
            f"an artifact may be at most {MAX_BYTES:,} bytes"
        )
    return Staged(key=key, kind=kind, title=checked_title, data=text)


# -- rows as clients see them ------------------------------------------------------


def _rfc3339(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Artifact:
    """One artifact; ``data`` is its JSON text (None when only the summary was read)."""

    key: str
    phase: int
    kind: str
    title: str | None
    created_at: dt.datetime
    data: str | None = None

    def summary(self) -> dict[str, Any]:
        """What the Run JSON lists."""
        return {"key": self.key, "phase": self.phase, "kind": self.kind, "title": self.title}

    def to_dict(self) -> dict[str, Any]:
        """``GET /runs/{id}/artifacts`` items, and with ``data`` the single artifact."""
        out = {**self.summary(), "created_at": _rfc3339(self.created_at)}
        if self.data is not None:
            out["data"] = json.loads(self.data)
        return out


# -- queries -------------------------------------------------------------------------

_b = sa.bindparam
_INSERT_RESULT = sa.insert(results_t)
_INSERT_ARTIFACT = sa.insert(artifacts_t)
_SUMMARY_COLUMNS = (
    artifacts_t.c.run_id,
    artifacts_t.c.key,
    artifacts_t.c.phase_num,
    artifacts_t.c.kind,
    artifacts_t.c.title,
    artifacts_t.c.created_at,
)
_IN_PHASE_ORDER = (artifacts_t.c.phase_num, artifacts_t.c.position, artifacts_t.c.key)
_SUMMARIES_OF = (
    sa.select(*_SUMMARY_COLUMNS)
    .where(artifacts_t.c.run_id.in_(_b("b_ids", expanding=True)))
    .order_by(artifacts_t.c.run_id, *_IN_PHASE_ORDER)
)
_RESULT_PHASES_OF = (
    sa.select(results_t.c.run_id, results_t.c.phase_num)
    .where(results_t.c.run_id.in_(_b("b_ids", expanding=True)))
    .order_by(results_t.c.run_id, results_t.c.phase_num)
)
# The same two for one run (GET /runs/{id}), on the hot path's compiled form.
_SUMMARIES_OF_RUN = Compiled(
    sa.select(*_SUMMARY_COLUMNS)
    .where(artifacts_t.c.run_id == _b("b_run"))
    .order_by(*_IN_PHASE_ORDER)
)
_RESULT_PHASES_OF_RUN = Compiled(
    sa.select(results_t.c.run_id, results_t.c.phase_num).where(results_t.c.run_id == _b("b_run"))
)
# The same two reads as JSON values of a run's one-statement read (runs.get_run, SQLite).
RESULT_PHASES_JSON = JsonRows([results_t.c.phase_num], results_t.c.run_id == _b("b_run"))
SUMMARIES_JSON = JsonRows(
    [*_SUMMARY_COLUMNS[1:], artifacts_t.c.position], artifacts_t.c.run_id == _b("b_run")
)
_RESULTS_OF_RUN = sa.select(results_t.c.phase_num, results_t.c.value).where(
    results_t.c.run_id == _b("b_run")
)
_KEYS_OF_RUN = sa.select(artifacts_t.c.key, artifacts_t.c.phase_num).where(
    artifacts_t.c.run_id == _b("b_run")
)
_ONE_RESULT = sa.select(results_t.c.value).where(
    results_t.c.run_id == _b("b_run"), results_t.c.phase_num == _b("b_phase")
)
_ARTIFACTS_OF_RUN = (
    sa.select(*_SUMMARY_COLUMNS, artifacts_t.c.data)
    .where(artifacts_t.c.run_id == _b("b_run"))
    .order_by(*_IN_PHASE_ORDER)
)


def save(
    conn: Connection,
    *,
    run_id: int,
    phase_num: int,
    result: str | None,
    artifacts: Sequence[Staged],
    now: dt.datetime | None,
) -> None:
    """Write a phase's result and artifacts; the caller's transaction is the phase's.

    ``now`` (the boundary's instant) is needed only when there are artifacts.
    """
    if result is not None:
        conn.execute(_INSERT_RESULT, {"run_id": run_id, "phase_num": phase_num, "value": result})
    if artifacts:
        conn.execute(
            _INSERT_ARTIFACT,
            [
                {
                    "run_id": run_id,
                    "key": a.key,
                    "phase_num": phase_num,
                    "position": position,
                    "kind": a.kind,
                    "title": a.title,
                    "data": a.data,
                    "created_at": now,
                }
                for position, a in enumerate(artifacts)
            ],
        )


def load_results(conn: Connection, *, run_id: int) -> dict[int, str]:
    """The committed results of a run, as JSON text by phase number (for ``ctx.results``)."""
    return {num: value for num, value in conn.execute(_RESULTS_OF_RUN, {"b_run": run_id})}


def published_keys(conn: Connection, *, run_id: int) -> dict[str, int]:
    """Artifact keys the run's committed phases published, and by which phase."""
    return {key: num for key, num in conn.execute(_KEYS_OF_RUN, {"b_run": run_id})}


def result_phases(conn: Connection, *, run_ids: Sequence[int]) -> dict[int, set[int]]:
    """For each run, the phases that stored a result (the Run JSON's ``has_result``)."""
    found: dict[int, set[int]] = {i: set() for i in run_ids}
    if len(run_ids) == 1:
        rows = _RESULT_PHASES_OF_RUN.execute(conn, {"b_run": run_ids[0]}).rows
    else:
        rows = list(conn.execute(_RESULT_PHASES_OF, {"b_ids": list(run_ids)})) if run_ids else []
    for run_id, num in rows:
        found[run_id].add(num)
    return found


def summaries(conn: Connection, *, run_ids: Sequence[int]) -> dict[int, list[Artifact]]:
    """For each run, its artifacts without their data, in phase order."""
    found: dict[int, list[Artifact]] = {i: [] for i in run_ids}
    if len(run_ids) == 1:
        rows = _SUMMARIES_OF_RUN.execute(conn, {"b_run": run_ids[0]}).rows
    else:
        rows = list(conn.execute(_SUMMARIES_OF, {"b_ids": list(run_ids)})) if run_ids else []
    for row in rows:
        found[row.run_id].append(
            Artifact(row.key, row.phase_num, row.kind, row.title, row.created_at)
        )
    return found


def summaries_from(rows: Sequence[Sequence[Any]]) -> list[Artifact]:
    """:data:`SUMMARIES_JSON`'s rows as a run's artifacts, in phase order (as :func:`summaries`)."""
    ordered = sorted(rows, key=lambda r: (r[1], r[5], r[0]))  # phase, position, key
    return [
        Artifact(key, phase, kind, title, created_at)
        for key, phase, kind, title, created_at, _ in ordered
    ]


def get_result(conn: Connection, *, run_id: int, phase_num: int) -> str | None:
    """One phase's result as JSON text, or None when it stored none."""
    value: str | None = conn.execute(_ONE_RESULT, {"b_run": run_id, "b_phase": phase_num}).scalar()
    return value


def list_artifacts(conn: Connection, *, run_id: int) -> list[Artifact]:
    """A run's artifacts with their data, in phase order."""
    return [
        Artifact(row.key, row.phase_num, row.kind, row.title, row.created_at, row.data)
        for row in conn.execute(_ARTIFACTS_OF_RUN, {"b_run": run_id})
    ]


def get_artifact(conn: Connection, *, run_id: int, key: str) -> Artifact | None:
    """One artifact with its data; None for a key that is not a slug or not published."""
    if KEY.fullmatch(key) is None:  # never sent to the database (PostgreSQL refuses NUL)
        return None
    row = conn.execute(
        sa.select(*_SUMMARY_COLUMNS, artifacts_t.c.data).where(
            artifacts_t.c.run_id == run_id, artifacts_t.c.key == key
        )
    ).first()
    if row is None:
        return None
    return Artifact(row.key, row.phase_num, row.kind, row.title, row.created_at, row.data)
