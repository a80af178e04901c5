"""What a run's params may be: one check at every door, before anything is written.

Runs are created over HTTP, by ``pipeline run --params`` and from Python
(``start_run``, ``Executor.start_reserved``), and every stored value is read
back by all the others: the REST API, the event streams, the dashboard and the
CLI. A value one of them cannot say back would break every later read of the
run: ``NaN`` and ``Infinity`` are not JSON (REST made them ``null``, the event
stream sent them raw, and the dashboard dropped the event); a lone surrogate
(``"\\ud800"``) cannot be encoded as UTF-8; a value nested 300 deep exceeds
the serializers' depth limits; an integer of more than 4,300 digits cannot be
turned into text at all (Python's limit on int-to-str conversion). So one
function, :func:`validate_params`, decides, and ``runs.create_run`` calls it,
so that no door can skip it; :func:`parse_json` reads JSON text with the same
rules, for the doors that receive text.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_BYTES = 64 * 1024
MAX_DEPTH = 32
MAX_INT_DIGITS = 4300  # Python refuses to convert longer integers to text


class InvalidParams(ValueError):
    """Params no reader could handle; the message says what is wrong, for the user."""


# One encoder: json.dumps with options builds a new one at each call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False)


def validate_params(params: object) -> dict[str, Any]:
    """The params as stored (``None`` means ``{}``), or :class:`InvalidParams`."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InvalidParams("'params' must be a JSON object (or null)")
    _check_tree(params)
    size = len(_ENCODER.encode(params).encode("utf-8"))
    if size > MAX_BYTES:
        raise InvalidParams(f"'params' is larger than {MAX_BYTES // 1024} KiB as JSON")
    return params


def _check_tree(root: dict[str, Any]) -> None:
    """Depth, types, numbers and text, iteratively (a deep value must not exhaust the stack)."""
    stack: list[tuple[object, int]] = [(root, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            if depth > MAX_DEPTH:
                raise InvalidParams(f"'params' is nested deeper than {MAX_DEPTH} levels")
            for key, child in value.items():
                if not isinstance(key, str):
                    raise InvalidParams("'params' keys must be strings")
                _check_text(key)
                stack.append((child, depth + 1))
        elif isinstance(value, list):
            if depth > MAX_DEPTH:
                raise InvalidParams(f"'params' is nested deeper than {MAX_DEPTH} levels")
            stack.extend((child, depth + 1) for child in value)
        elif isinstance(value, str):
            _check_text(value)
        elif isinstance(value, bool) or value is None:
            pass
        elif isinstance(value, int):
            _check_int_digits(value)
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise InvalidParams("numbers in 'params' must be finite (no NaN or Infinity)")
        else:
            raise InvalidParams(f"'params' may hold only JSON values, not {type(value).__name__}")


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidParams("'params' contains text that is not valid Unicode") from None


def _check_int_digits(value: int) -> None:
    try:
        digits = len(str(abs(value)))
    except ValueError:  # beyond sys.get_int_max_str_digits(): not even printable
        digits = MAX_INT_DIGITS + 1
    if digits > MAX_INT_DIGITS:
        raise InvalidParams(f"an integer in 'params' has more than {MAX_INT_DIGITS} digits")


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise InvalidParams(f"an integer in 'params' has more than {MAX_INT_DIGITS} digits")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400: valid JSON syntax, but no JSON can say it back
        raise InvalidParams(f"the number {text} is out of range (numbers must be finite)")
    return value


def _constant(name: str) -> Any:
    raise InvalidParams(f"{name} is not valid JSON (numbers must be finite)")


def parse_json(text: str | bytes) -> Any:
    """JSON text with the rules above for numbers; :class:`InvalidParams` if it is not that."""
    try:
        return json.loads(text, parse_constant=_constant, parse_float=_float, parse_int=_int)
    except InvalidParams:
        raise
    except RecursionError:
        raise InvalidParams(f"the JSON is nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        raise InvalidParams(f"not valid JSON: {exc}") from None
