"""Strict parsing of a ``.zmoe`` index and short renderings of what it holds, for messages
(format/SPEC.md §2 and §9, "Index JSON").

The index is JSON from an untrusted file: :func:`unique_pairs` and :func:`reject_constant` are
the ``json.loads`` hooks that refuse a key twice in one object and ``NaN``/``Infinity``;
:func:`locate` walks the text of an index that failed to parse to name the JSON path of the
problem (``tensors[3].shape[0]``), bounding the nesting at :data:`MAX_JSON_DEPTH`.
:func:`json_kind`, :func:`show` and :func:`quote_name` render hostile values (megabytes in one
field, 900 levels of nesting) in a few dozen characters. :func:`zmoe.validate.parse_index` puts
them together; :mod:`zmoe.validate_tensors` uses the renderings in its messages.
"""
from __future__ import annotations

import json
import re

#: Deepest nesting of JSON arrays/objects in the index (SPEC §9): enforced for metadata ``json``
#: values (all other schema fields have flat types) and when naming where a parse failed; the
#: schema itself needs 6.
MAX_JSON_DEPTH = 64
#: Python refuses to parse JSON integers longer than this (``sys.get_int_max_str_digits``).
_INT_DIGITS = 4300


def json_kind(v) -> str:
    """A JSON value's kind for messages (``"array"``, ``"null"``, ...)."""
    if v is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(v), type(v).__name__)


def _brief(v, depth: int = 3, items: int = 8) -> str:
    """JSON-like text of ``v`` that stays short whatever ``v`` is: at most ``items`` members per
    array/object, ``depth`` levels, 40 characters per string (never recursing deeper)."""
    if type(v) is list:
        if not depth:
            return "[...]" if v else "[]"
        more = ", ..." if len(v) > items else ""
        return "[" + ", ".join(_brief(x, depth - 1, items) for x in v[:items]) + more + "]"
    if type(v) is dict:
        if not depth:
            return "{...}" if v else "{}"
        kv = [f"{_brief(k)}: {_brief(x, depth - 1, items)}" for k, x in list(v.items())[:items]]
        return "{" + ", ".join(kv) + (", ..." if len(v) > items else "") + "}"
    if type(v) is str:
        return json.dumps(v[:40]) + ("..." if len(v) > 40 else "")
    if type(v) is int and v.bit_length() > 200:
        return f"an integer of {len(str(abs(v))) if v.bit_length() < 14000 else 'over 4000'} digits"
    try:
        return json.dumps(v)
    except (TypeError, ValueError):
        return repr(v)


def show(v, limit: int = 60) -> str:
    """A short rendering of a JSON value for messages (long or deep values are cut, never
    printed whole: a hostile index may hold megabytes, or 900 levels, in one field)."""
    s = _brief(v)
    return s if len(s) <= limit else s[:limit] + f"... ({json_kind(v)})"


def quote_name(s) -> str:
    """``repr`` of a name, cut to 200 characters (a hostile index may hold a huge one)."""
    return repr(s) if len(s) <= 200 else repr(s[:200]) + f"... ({len(s)} characters)"


# -- parse hooks and error location (SPEC §2) ---------------------------------------------------
class _JsonProblem(ValueError):
    """Raised by the parse hooks; the walk of :func:`locate` then finds where."""


def unique_pairs(pairs):
    """``object_pairs_hook`` for ``json.loads``: the object as a dict, refusing a key that
    appears twice in it (raises a ``ValueError``)."""
    d = dict(pairs)
    if len(d) != len(pairs):
        raise _JsonProblem("duplicate key")
    return d


def reject_constant(name):
    """``parse_constant`` hook for ``json.loads``: refuses ``NaN``, ``Infinity`` and
    ``-Infinity``, which are not JSON (raises a ``ValueError``)."""
    raise _JsonProblem(f"{name} is not JSON")


_TOKEN = re.compile(r'\s*(?:("[^"\\]*(?:\\.[^"\\]*)*")|([{}\[\]:,])|(-?[0-9][0-9.eE+-]*)'
                    r'|(true|false|null|NaN|-?Infinity))', re.S)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _path(stack) -> str:
    out = ""
    for is_obj, key, _ in stack:
        if key is None:
            continue
        if is_obj:
            out += f".{key}" if _IDENT.match(key) else f"[{quote_name(key)}]"
        else:
            out += f"[{key}]"
    out = out.lstrip(".") or "top level"
    return out if len(out) <= 160 else out[:100] + "..." + out[-40:]


def locate(text: str, stop: int | None = None) -> tuple[str, str | None]:
    """Walk the index text to name where a parse failed: ``(where, problem)`` of the first
    duplicate key, nesting deeper than :data:`MAX_JSON_DEPTH`, integer too long to parse or
    NaN/Infinity; or where byte ``stop`` lies, with problem None. ``where`` is a JSON path
    (``tensors[3].shape[0]``), with the tensor's name when the walk has passed it. Slow (Python
    per token): run only on a failed parse."""
    stack = []      # frames [is_object, current key or index, keys seen]
    want_key = False
    name = None     # "name" of the tensor record being walked

    def where(frames):
        p = _path(frames)
        if name is not None and len(frames) >= 3 and frames[0][1] == "tensors":
            return f"tensor {quote_name(name)} ({p})"
        return p

    for m in _TOKEN.finditer(text):
        if stop is not None and m.end() > stop:
            break
        s, punct, num, lit = m.groups()
        if punct in ("{", "["):
            stack.append([punct == "{", None if punct == "{" else 0, set()])
            want_key = punct == "{"
            if len(stack) == 3:
                name = None
            if len(stack) > MAX_JSON_DEPTH:
                return where(stack[:-1]), f"nested deeper than {MAX_JSON_DEPTH} levels"
        elif punct in ("}", "]"):
            if stack:
                stack.pop()
            want_key = False
        elif punct == ",":
            if stack and stack[-1][0]:
                want_key = True
            elif stack:
                stack[-1][1] += 1
        elif punct == ":":
            want_key = False
        elif s is not None and stack and stack[-1][0]:
            try:
                v = json.loads(s)
            except ValueError:
                v = s
            frame = stack[-1]
            if want_key:
                frame[1] = v
                if v in frame[2]:
                    return where(stack), "the key appears twice in its object"
                frame[2].add(v)
            elif len(stack) == 3 and frame[1] == "name" and stack[0][1] == "tensors":
                name = v
        elif num is not None and num.lstrip("-").isdigit() and len(num.lstrip("-")) > _INT_DIGITS:
            return where(stack), f"an integer of {len(num.lstrip('-'))} digits"
        elif lit is not None and lit.lstrip("-") in ("NaN", "Infinity"):
            return where(stack), f"{lit} is not JSON"
    return where(stack), None

