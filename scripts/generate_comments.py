"""Generate the example pipeline's dataset: synthetic Reddit-style comments.

The example pipeline (``pipeline.example``) must do real work on data that
ships with the project, without a network or an account anywhere. This script
writes that data once, deterministically (fixed seed, gzip header without a
timestamp), so re-running it reproduces the committed file byte for byte and
a diff in review means the generator really changed.

Each line is a JSON object: ``id``, ``thread_id``, ``author``, ``body``,
``created_utc``. Every thread leans positive or negative, so the analysis has
something to find. A handful of deliberately malformed lines (invalid JSON,
a missing field, an empty body, wrong types) exercise the fetch phase's
validation and its warnings.

Usage (from the repository root)::

    python scripts/generate_comments.py
"""

from __future__ import annotations

import gzip
import io
import json
import random
from pathlib import Path

SEED = 20240611
COMMENTS = 3000
THREADS = 60
AUTHORS = 300
START_UTC = 1_704_067_200  # 2024-01-01T00:00:00Z

OUTPUT = Path(__file__).resolve().parents[1] / "src" / "pipeline" / "data" / "comments.jsonl.gz"

# The sentiment words are in the pipeline's lexicon (pipeline.example.LEXICON);
# the neutral ones are not, so comments built mostly from them score near zero.
POSITIVE_ADJ = [
    "great", "awesome", "helpful", "excellent", "amazing", "nice", "brilliant",
    "fantastic", "clear", "fun", "beautiful", "solid", "impressive", "useful",
    "perfect", "good", "smooth", "fair",
]  # fmt: skip
NEGATIVE_ADJ = [
    "terrible", "awful", "useless", "wrong", "broken", "boring", "annoying",
    "bad", "disappointing", "confusing", "slow", "ugly", "stupid", "horrible",
    "misleading", "buggy", "overpriced", "lazy",
]  # fmt: skip
NEUTRAL_ADJ = ["okay", "different", "new", "long", "short", "unusual", "expected"]
POSITIVE_VERB = ["love", "enjoy", "like", "recommend", "appreciate"]
NEGATIVE_VERB = ["hate", "dislike", "regret", "avoid"]
NEUTRAL_VERB = ["noticed", "tried", "read", "watched"]
POSITIVE_ASIDE = ["Thanks for posting!", "Happy to see this.", "Best thread this week.", "Agree."]
NEGATIVE_ASIDE = [
    "What a waste of time.",
    "Sad to see this.",
    "Worst thread this week.",
    "Disagree.",
]
NOUNS = [
    "update", "ending", "interface", "pricing", "soundtrack", "intro", "layout",
    "support", "crust", "tutorial", "battery", "schedule",
]  # fmt: skip
TOPICS = [
    "the new patch",
    "this recipe",
    "the latest release",
    "that movie",
    "the city council plan",
    "this library",
    "the season finale",
    "the build guide",
    "their customer service",
    "the documentation",
    "this keyboard",
    "the transit update",
]
TEMPLATES = [
    "Honestly {topic} is {a1}.",
    "I think {topic} is {a1} and {a2}.",
    "{A1}! {topic} was {a2} for me.",
    "Not sure why people say {topic} is {a1}; the {n1} felt {a2} to me.",
    "Tried {topic} this weekend and the {n1} was {a1}.",
    "The {n1} in {topic} is {a1}, but the {n2} is {a2}.",
    "I {v1} {topic}, the {n1} is {a1}.",
    "Anyone else find {topic} {a1}?",
    "Edit: after the {n1} change, {topic} feels {a1}.",
    "{aside} To me {topic} is {a1} and I {v1} the {n1}.",
]


def _pick(rng: random.Random, lean: float, pos: list[str], neg: list[str], neu: list[str]) -> str:
    """A positive word with probability ``lean``, else a negative one (sometimes neutral)."""
    if rng.random() < 0.2:
        return rng.choice(neu)
    return rng.choice(pos if rng.random() < lean else neg)


def _body(rng: random.Random, lean: float) -> str:
    sentences = []
    for _ in range(rng.choice((1, 1, 2, 2, 3))):
        a1 = _pick(rng, lean, POSITIVE_ADJ, NEGATIVE_ADJ, NEUTRAL_ADJ)
        aside = rng.choice(POSITIVE_ASIDE if rng.random() < lean else NEGATIVE_ASIDE)
        sentence = rng.choice(TEMPLATES).format(
            topic=rng.choice(TOPICS),
            a1=a1,
            A1=a1.capitalize(),
            a2=_pick(rng, lean, POSITIVE_ADJ, NEGATIVE_ADJ, NEUTRAL_ADJ),
            v1=_pick(rng, lean, POSITIVE_VERB, NEGATIVE_VERB, NEUTRAL_VERB),
            n1=rng.choice(NOUNS),
            n2=rng.choice(NOUNS),
            aside=aside,
        )
        sentences.append(sentence[0].upper() + sentence[1:])
    return " ".join(sentences)


def _comments(rng: random.Random) -> list[dict[str, object]]:
    # Each thread leans one way: from clearly negative (0.1) to clearly positive (0.9).
    leans = [rng.uniform(0.1, 0.9) for _ in range(THREADS)]
    starts = sorted(rng.randrange(0, 90 * 86_400) for _ in range(THREADS))
    # A few authors write a lot, most write a little (a skewed, Reddit-like spread).
    weights = [1.0 / (rank + 1) ** 0.8 for rank in range(AUTHORS)]
    authors: list[str] = []
    while len(authors) < AUTHORS:
        name = f"user_{rng.randrange(16**6):06x}"
        if name not in authors:
            authors.append(name)
    records: list[dict[str, object]] = []
    for number in range(1, COMMENTS + 1):
        thread = rng.randrange(THREADS)
        records.append(
            {
                "id": f"c{number:06d}",
                "thread_id": f"t{thread + 1:04d}",
                "author": rng.choices(authors, weights)[0],
                "body": _body(rng, leans[thread]),
                "created_utc": START_UTC + starts[thread] + rng.randrange(0, 3 * 86_400),
            }
        )
    records.sort(key=lambda r: (int(str(r["created_utc"])), str(r["id"])))
    return records


def _malformed() -> list[str]:
    """Seven broken lines, one kind of breakage each, as a real feed might have."""
    good = {
        "thread_id": "t0001",
        "author": "user_deadbeef",
        "body": "This line is broken on purpose.",
        "created_utc": START_UTC,
    }
    missing_author = {k: v for k, v in good.items() if k != "author"}
    return [
        # Truncated mid-object, as a dropped connection leaves it.
        '{"id": "c900001", "thread_id": "t0003", "author": "user_0badc0", "bo',
        # Not JSON at all: an error page where data was expected.
        "<html><body>502 Bad Gateway</body></html>",
        # Valid JSON, but not an object.
        json.dumps(["c900003", "t0004", "user_0badc0", "an array, not an object", START_UTC]),
        json.dumps({"id": "c900004", **missing_author}),
        json.dumps({"id": "c900005", **good, "body": ""}),
        json.dumps({"id": "c900006", **good, "created_utc": str(START_UTC)}),
        json.dumps({**good, "id": 900007}),
    ]


def generate() -> bytes:
    rng = random.Random(SEED)
    lines = [json.dumps(r, separators=(",", ":")) for r in _comments(rng)]
    for bad in _malformed():
        lines.insert(rng.randrange(1, len(lines)), bad)
    text = "\n".join(lines) + "\n"
    buffer = io.BytesIO()
    # mtime=0 and no file name in the header: the same input gives the same bytes.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as gz:
        gz.write(text.encode("utf-8"))
    return buffer.getvalue()


def main() -> None:
    data = generate()
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_bytes(data)
    print(f"wrote {OUTPUT} ({len(data):,} bytes)")


if __name__ == "__main__":
    main()
