"""The example pipeline: the project's default registry (``pipeline.example:PHASES``).

It does real work on a small dataset shipped with the package
(``pipeline/data/comments.jsonl.gz``, made by ``scripts/generate_comments.py``):
about 3,000 Reddit-style comments in 60 threads, with a few malformed lines.

1. "Fetching Reddit" reads and validates the comments, pausing per page of
   100 lines as if it were calling a rate-limited API.
2. "Analyzing comments" scores each comment's sentiment with a small lexicon.
3. "Aggregating threads" summarises the scores per thread and per author,
   and returns the run's figures as its result.
4. "Writing report" reads those figures from ``ctx.results`` and publishes
   the report as artifacts: a markdown summary, a table of the most positive
   and most negative threads, and two charts (the sentiment distribution;
   comments by hour of the day).

Phases 1 and 3 return their figures (``ctx.results``): they are stored with
the phase, so the report reads them even after a resume in another process.

It is also the reference for how a phase should treat the database (DESIGN.md,
"SQLite transactions"). The runner hands each phase a connection inside the
phase's own transaction, and on SQLite that transaction sends ``BEGIN
IMMEDIATE`` (taking the database's single write lock) just before its first
statement. So a phase does its slow work (network, parsing, computing) before
it touches the database, or between one quick read and one burst of writes,
and writes its rows in one ``executemany``. Other runs and API requests then
wait milliseconds for the lock instead of seconds.

Several runs may execute at once: every read and write is scoped to
``ctx.run_id``. Parameters (``ctx.params``), all optional, unknown keys ignored:

* ``fetch_delay``: seconds to pause per page while fetching, 0 to 5 (default 0.05).
* ``limit``: read at most this many comments (an integer >= 1; default: all).
"""

from __future__ import annotations

import gzip
import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any

import pydantic
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline.orchestrator import PhaseFn, RunContext
from pipeline.pipelines import Pipeline
from pipeline.schema import (
    example_author_stats,
    example_comments,
    example_scores,
    example_thread_stats,
)

DATASET = "comments.jsonl.gz"
PAGE_SIZE = 100
DEFAULT_FETCH_DELAY = 0.05
MAX_FETCH_DELAY = 5.0
ANALYZE_PROGRESS_EVERY = 250
REPORT_TOP = 5
# Sentiment buckets of the distribution chart: (label, upper bound, exclusive).
SENTIMENT_BUCKETS = (
    ("very negative", -0.5),
    ("negative", -0.1),
    ("neutral", 0.1),
    ("positive", 0.5),
    ("very positive", math.inf),
)
MOOD_NEUTRAL = 0.05  # a mean score within this of 0 is a neutral mood

# Column widths in pipeline.schema: SQLite would store a longer value silently,
# PostgreSQL would fail the whole phase on it, so the fetch rejects it up front.
_MAX_LENGTHS = {"id": 32, "thread_id": 32, "author": 64}

# A small sentiment lexicon: word -> weight (positive is good). Hand-made and
# deliberately tiny; the point is a pipeline that does honest work, not NLP.
LEXICON: dict[str, float] = {
    # positive
    "amazing": 3.0,
    "awesome": 3.0,
    "brilliant": 3.0,
    "excellent": 3.0,
    "fantastic": 3.0,
    "perfect": 3.0,
    "wonderful": 3.0,
    "love": 3.0,
    "best": 2.5,
    "beautiful": 2.0,
    "great": 2.0,
    "helpful": 2.0,
    "impressive": 2.0,
    "useful": 2.0,
    "enjoy": 2.0,
    "recommend": 2.0,
    "appreciate": 2.0,
    "happy": 2.0,
    "excited": 2.0,
    "good": 1.5,
    "nice": 1.5,
    "fun": 1.5,
    "solid": 1.5,
    "thanks": 1.5,
    "clear": 1.0,
    "smooth": 1.0,
    "fair": 1.0,
    "like": 1.0,
    "agree": 1.0,
    # negative
    "awful": -3.0,
    "horrible": -3.0,
    "terrible": -3.0,
    "worst": -3.0,
    "hate": -3.0,
    "garbage": -3.0,
    "scam": -3.0,
    "useless": -2.5,
    "stupid": -2.5,
    "bad": -2.0,
    "broken": -2.0,
    "annoying": -2.0,
    "disappointing": -2.0,
    "ugly": -2.0,
    "misleading": -2.0,
    "buggy": -2.0,
    "dislike": -2.0,
    "regret": -2.0,
    "waste": -2.0,
    "poor": -2.0,
    "wrong": -1.5,
    "boring": -1.5,
    "confusing": -1.5,
    "overpriced": -1.5,
    "lazy": -1.5,
    "avoid": -1.5,
    "sad": -1.5,
    "slow": -1.0,
    "disagree": -1.0,
    "meh": -0.5,
}
# "not great" is not great: a negator flips the sign of the word right after it.
NEGATORS = frozenset({"not", "no", "never", "isn't", "wasn't", "don't", "didn't", "doesn't"})

_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)?")


# -- 1. fetching -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Comment:
    id: str
    thread_id: str
    author: str
    body: str
    created_utc: int


class MalformedLine(ValueError):
    """One line of the feed that cannot be a comment; the message says why."""


def _shown(value: object) -> str:
    """A parameter as the client wrote it (JSON), for error messages."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _fetch_delay(params: Mapping[str, Any]) -> float:
    """``fetch_delay``, checked: a bad value fails the run at once with a clear message."""
    value = params.get("fetch_delay")
    if value is None:
        return DEFAULT_FETCH_DELAY
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 <= value <= MAX_FETCH_DELAY
    ):
        raise ValueError(
            f"params.fetch_delay must be a number of seconds from 0 to {MAX_FETCH_DELAY:g}, "
            f"not {_shown(value)}"
        )
    return float(value)


def _limit(params: Mapping[str, Any]) -> int | None:
    """``limit``, checked: None (read everything) or a whole number >= 1."""
    value = params.get("limit")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"params.limit must be a whole number >= 1, not {_shown(value)}")
    return value


def _json_type(value: object) -> str:
    """JSON's name for a decoded value's type, for messages about the feed."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def parse_line(raw: bytes) -> Comment:
    """Decode and validate one line of the feed, or raise :class:`MalformedLine`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedLine(f"not valid UTF-8 (byte {exc.start})") from None
    if not text.strip():
        raise MalformedLine("empty line")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MalformedLine(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(record, dict):
        raise MalformedLine(f"expected a JSON object, got {_json_type(record)}")
    missing = [k for k in ("id", "thread_id", "author", "body", "created_utc") if k not in record]
    if missing:
        raise MalformedLine("missing field " + ", ".join(repr(k) for k in missing))
    for key in ("id", "thread_id", "author", "body"):
        if not isinstance(record[key], str):
            raise MalformedLine(f"{key!r} must be a string, got {_json_type(record[key])}")
    created = record["created_utc"]
    if isinstance(created, bool) or not isinstance(created, int):
        raise MalformedLine(f"'created_utc' must be an integer, got {_json_type(created)}")
    for key, longest in _MAX_LENGTHS.items():
        if not record[key].strip() or len(record[key]) > longest:
            raise MalformedLine(f"{key!r} must be 1 to {longest} characters, got {record[key]!r}")
    if not record["body"].strip():
        raise MalformedLine("'body' is empty")
    return Comment(
        id=record["id"],
        thread_id=record["thread_id"],
        author=record["author"],
        body=record["body"],
        created_utc=created,
    )


def _dataset_lines() -> list[bytes]:
    """The feed's lines (bytes, so that one undecodable line spoils only itself)."""
    data = gzip.decompress((resources.files("pipeline") / "data" / DATASET).read_bytes())
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # the newline that ends the last line
    return [line.removesuffix(b"\r") for line in lines]


def fetch_phase(conn: Connection, ctx: RunContext) -> dict[str, int]:
    """Fetch the comments page by page, validate them, then store them in one burst.

    The slow part (a pause per page, standing in for a rate-limited API) and
    the parsing run before the phase's first statement, so on SQLite the write
    lock is not taken until all of it is done: other runs and API requests are
    never kept waiting by the network. A malformed line is a warning, not a
    failure: one bad record in a feed must not cost the whole run.
    """
    delay = _fetch_delay(ctx.params)
    limit = _limit(ctx.params)
    lines = _dataset_lines()
    total = len(lines)
    comments: list[Comment] = []
    first_seen: dict[str, int] = {}
    malformed = 0
    read = 0  # lines read so far; line numbers are 1-based
    while read < total and (limit is None or len(comments) < limit):
        ctx.raise_if_cancelled()
        if delay:
            time.sleep(delay)
        for raw in lines[read : read + PAGE_SIZE]:
            if limit is not None and len(comments) >= limit:
                break
            read += 1
            number = read
            try:
                comment = parse_line(raw)
                first = first_seen.get(comment.id)
                if first is not None:
                    raise MalformedLine(
                        f"duplicate comment id {comment.id!r} (first on line {first})"
                    )
            except MalformedLine as exc:
                malformed += 1
                ctx.warn(f"{DATASET} line {number}: {exc}; skipped")
                continue
            first_seen[comment.id] = number
            comments.append(comment)
        ctx.progress(read, total)
    ctx.progress(total, total)  # a limit may end the fetch early: it is done all the same
    ctx.raise_if_cancelled()
    ctx.logger.info(
        "fetched %d comments from %d lines (%d malformed, skipped)", len(comments), read, malformed
    )
    figures = {"lines": read, "kept": len(comments), "skipped": malformed}
    if not comments:
        return figures
    conn.execute(
        sa.insert(example_comments),
        [
            {
                "run_id": ctx.run_id,
                "comment_id": c.id,
                "thread_id": c.thread_id,
                "author": c.author,
                "body": c.body,
                "created_utc": c.created_utc,
            }
            for c in comments
        ],
    )
    return figures


# -- 2. analyzing ----------------------------------------------------------------


def tokenize(text: str) -> list[str]:
    """Lowercase words (with inner apostrophes, so "don't" stays one token)."""
    return _TOKEN.findall(text.lower())


def sentiment(tokens: list[str]) -> float:
    """A score in (-1, 1): the lexicon's weights summed, scaled by length, squashed.

    Dividing by the square root of the length keeps a long rant from scoring
    far beyond a short one with the same tone, without drowning a clear word
    in a long comment; ``tanh`` bounds the result so means stay comparable.
    A negator flips the next word's weight.
    """
    if not tokens:
        return 0.0
    total = 0.0
    for index, token in enumerate(tokens):
        weight = LEXICON.get(token)
        if weight is None:
            continue
        if index > 0 and tokens[index - 1] in NEGATORS:
            weight = -weight
        total += weight
    return math.tanh(total / math.sqrt(len(tokens)))


def analyze_phase(conn: Connection, ctx: RunContext) -> None:
    """Score every comment of this run, then store the scores in one burst.

    One read, pure computation in memory (milliseconds for the dataset), one
    ``executemany``: the phase holds SQLite's write lock only briefly, and
    there is never a read-then-write gap another writer could slip into.
    """
    rows = conn.execute(
        sa.select(example_comments.c.comment_id, example_comments.c.body)
        .where(example_comments.c.run_id == ctx.run_id)
        .order_by(example_comments.c.comment_id)
    ).all()
    total = len(rows)
    scores: list[dict[str, Any]] = []
    for done, (comment_id, body) in enumerate(rows):
        if done % ANALYZE_PROGRESS_EVERY == 0:
            ctx.progress(done, total)
            ctx.raise_if_cancelled()
        tokens = tokenize(body)
        scores.append(
            {
                "run_id": ctx.run_id,
                "comment_id": comment_id,
                "tokens": len(tokens),
                "score": sentiment(tokens),
            }
        )
    ctx.progress(total, total)
    ctx.logger.info("scored %d comments", total)
    if scores:
        conn.execute(sa.insert(example_scores), scores)


# -- 3. aggregating --------------------------------------------------------------


def _bucket(score: float) -> int:
    return next(i for i, (_, upper) in enumerate(SENTIMENT_BUCKETS) if score < upper)


def _figures(conn: Connection, run_id: int) -> dict[str, Any]:
    """The run's figures: counts, the mean, the sentiment distribution, comments by hour."""
    c, s = example_comments, example_scores
    rows = conn.execute(
        sa.select(s.c.score, c.c.created_utc)
        .select_from(
            sa.join(c, s, sa.and_(s.c.run_id == c.c.run_id, s.c.comment_id == c.c.comment_id))
        )
        .where(c.c.run_id == run_id)
    ).all()
    distribution = [0] * len(SENTIMENT_BUCKETS)
    by_hour = [0] * 24
    for score, created in rows:
        distribution[_bucket(score)] += 1
        by_hour[(created // 3600) % 24] += 1

    def count(table: sa.Table) -> int:
        query = sa.select(sa.func.count()).select_from(table).where(table.c.run_id == run_id)
        return int(conn.execute(query).scalar_one())

    mean = sum(score for score, _ in rows) / len(rows) if rows else 0.0
    return {
        "comments": len(rows),
        "threads": count(example_thread_stats),
        "authors": count(example_author_stats),
        "mean_score": round(mean, 4),
        "sentiment": {
            "buckets": [label for label, _ in SENTIMENT_BUCKETS],
            "counts": distribution,
        },
        "comments_by_hour": by_hour,
    }


def aggregate_phase(conn: Connection, ctx: RunContext) -> dict[str, Any]:
    """Per-thread and per-author statistics, computed where the rows are; returns the figures.

    ``INSERT ... SELECT ... GROUP BY`` moves no rows through Python and is the
    same SQL on SQLite and PostgreSQL. ``run_id`` is selected and grouped as a
    column, not bound as a literal, so no backend has to guess a parameter's
    type in a select list.
    """
    c, s = example_comments, example_scores
    scored = sa.join(c, s, sa.and_(s.c.run_id == c.c.run_id, s.c.comment_id == c.c.comment_id))
    threads = (
        sa.select(
            c.c.run_id,
            c.c.thread_id,
            sa.func.count(),
            sa.func.count(sa.distinct(c.c.author)),
            sa.func.avg(s.c.score),
        )
        .select_from(scored)
        .where(c.c.run_id == ctx.run_id)
        .group_by(c.c.run_id, c.c.thread_id)
    )
    conn.execute(
        sa.insert(example_thread_stats).from_select(
            ["run_id", "thread_id", "comments", "authors", "mean_score"], threads
        )
    )
    ctx.progress(1, 2)
    ctx.raise_if_cancelled()
    authors = (
        sa.select(c.c.run_id, c.c.author, sa.func.count(), sa.func.avg(s.c.score))
        .select_from(scored)
        .where(c.c.run_id == ctx.run_id)
        .group_by(c.c.run_id, c.c.author)
    )
    conn.execute(
        sa.insert(example_author_stats).from_select(
            ["run_id", "author", "comments", "mean_score"], authors
        )
    )
    ctx.progress(2, 2)
    return _figures(conn, ctx.run_id)


# -- 4. reporting ----------------------------------------------------------------


def _mood(mean: float) -> str:
    if mean > MOOD_NEUTRAL:
        return "positive"
    if mean < -MOOD_NEUTRAL:
        return "negative"
    return "neutral"


def _top_threads(conn: Connection, run_id: int, *, most_positive: bool) -> list[list[Any]]:
    """The ``REPORT_TOP`` threads at one end of the scale, as table rows."""
    t = example_thread_stats
    order = t.c.mean_score.desc() if most_positive else t.c.mean_score.asc()
    rows = conn.execute(
        sa.select(t.c.thread_id, t.c.mean_score, t.c.comments, t.c.authors)
        .where(t.c.run_id == run_id)
        .order_by(order, t.c.thread_id)
        .limit(REPORT_TOP)
    )
    end = "most positive" if most_positive else "most negative"
    return [
        [thread_id, end, round(mean_score, 3), comments, authors]
        for thread_id, mean_score, comments, authors in rows
    ]


def _summary(fetched: Mapping[str, Any], figures: Mapping[str, Any]) -> str:
    mean = figures["mean_score"]
    return "\n".join(
        [
            "# Sentiment report",
            "",
            f"The overall mood is **{_mood(mean)}** (mean sentiment {mean:+.3f}, from -1 to +1).",
            "",
            f"- Threads analysed: {figures['threads']}",
            f"- Comments kept: {fetched.get('kept', figures['comments'])}",
            f"- Comments skipped (malformed): {fetched.get('skipped', 0)}",
            f"- Authors: {figures['authors']}",
            "",
            "Scores come from a small lexicon (`pipeline.example.LEXICON`); "
            "a negator flips the next word.",
        ]
    )


def report_phase(conn: Connection, ctx: RunContext) -> None:
    """Publish the report: a summary, the extreme threads, and two charts.

    The figures come from the aggregate phase's result (``ctx.results[3]``)
    and the fetch's (``ctx.results[1]``), read from what those phases
    committed. A run that fetched nothing still completes (the empty result
    is the truth), with a warning and a one-line report.
    """
    figures = ctx.results.get(3)
    fetched = ctx.results.get(1) or {}
    if not figures or not figures["comments"]:
        ctx.warn("this run has no comments (none were fetched): the report is empty")
        ctx.artifact(
            "summary", title="Summary", markdown="# Sentiment report\n\nNo comments were fetched."
        )
        return
    ctx.artifact("summary", title="Summary", markdown=_summary(fetched, figures))
    rows = _top_threads(conn, ctx.run_id, most_positive=True)
    rows += _top_threads(conn, ctx.run_id, most_positive=False)
    ctx.artifact(
        "threads",
        title="Most positive and most negative threads",
        table={"columns": ["thread", "end", "mean score", "comments", "authors"], "rows": rows},
    )
    sentiment = figures["sentiment"]
    ctx.artifact(
        "sentiment",
        title="Sentiment distribution",
        chart={
            "type": "bar",
            "x": sentiment["buckets"],
            "series": [{"name": "comments", "values": sentiment["counts"]}],
        },
    )
    ctx.artifact(
        "comments-by-hour",
        title="Comments by hour of the day (UTC)",
        chart={
            "type": "line",
            "x": list(range(24)),
            "series": [{"name": "comments", "values": figures["comments_by_hour"]}],
        },
    )
    ctx.logger.info(
        "report: %d comments in %d threads, mood %s (%+.3f)",
        figures["comments"],
        figures["threads"],
        _mood(figures["mean_score"]),
        figures["mean_score"],
    )
    ctx.progress(1, 1)


PHASES: list[tuple[int, str, PhaseFn]] = [
    (1, "Fetching Reddit", fetch_phase),
    (2, "Analyzing comments", analyze_phase),
    (3, "Aggregating threads", aggregate_phase),
    (4, "Writing report", report_phase),
]


class ExampleParams(pydantic.BaseModel):
    """What a run of the example may be given; bad values are a 422, not a failed run."""

    fetch_delay: Annotated[
        float,
        pydantic.Field(
            ge=0,
            le=MAX_FETCH_DELAY,
            allow_inf_nan=False,
            description=f"Seconds to pause per page while fetching, 0 to {MAX_FETCH_DELAY:g}.",
        ),
    ] = DEFAULT_FETCH_DELAY
    limit: Annotated[
        int | None,
        pydantic.Field(ge=1, description="Read at most this many comments (default: all)."),
    ] = None


# The default PIPELINE_PHASES: the example with its params model. Named like
# the plain PHASES loads ("phases"), which is also the name migration 0004 gave
# the runs made before pipelines existed, so they go on under it.
PIPELINE = Pipeline(
    "phases",
    PHASES,
    params=ExampleParams,
    description="The example: sentiment of a bundled Reddit comment dump, with a report.",
)
