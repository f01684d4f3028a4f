"""Bounds on rendering a chat template: a template from a stranger's file must not hang or
exhaust memory.

A chat template is code from the model file. Jinja2's sandbox stops it from reaching Python's
internals, but not from looping ``{% for i in range(100000) %}`` inside another such loop or
writing ``{{ 'x' * 1000000000 }}``. Every render of a template compiled by
:func:`zipmoe_rt.chat_template.compile_chat_template` therefore runs under a per-render
:class:`_Budget`, counted in work done rather than in wall-clock time (so the outcome is the same
on every machine):

* steps: elements handed out by ``range``, iterations of ``{% for %}`` loops and calls, and
  one for every :data:`SCAN_CHARS_PER_STEP` characters or items a call, filter or ``in`` test
  reads (``s.count(x)`` on a long string in a loop costs what its scanning costs);
* sizes: the length of every string or list an operator, call, filter or ``~`` builds (checked
  *before* building it where the size is known in advance, as for ``'x' * n``), the total of
  those lengths, and the size of integers ``*`` and ``**`` build;
* output: the characters the render writes.

Past a budget the render stops with :class:`RenderLimitError` (a ``TemplateError``), which
:func:`~zipmoe_rt.chat_template.render_chat_template` reports as
``chat_template: rendering stopped: ...``. The budgets scale with the conversation passed in, so
a long real conversation is never refused for its own length.
"""
from __future__ import annotations

import contextvars
import math
import re
from typing import Any, Iterable, Iterator

import jinja2
import jinja2.compiler
import jinja2.exceptions
import jinja2.nodes
import jinja2.runtime
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["RenderLimitError", "BoundedEnvironment", "STEP_BUDGET", "SCAN_CHARS_PER_STEP", "SIZE_BUDGET",
           "OUTPUT_BUDGET", "TOTAL_SIZE_FACTOR", "INT_BITS_BUDGET"]

#: Elements ``range`` hands out, ``{% for %}`` iterations and calls, per render (plus
#: ``STEPS_PER_INPUT_ITEM`` for each message, tool, document or content block passed in). Real
#: templates loop over the messages and, within each, over tools or content blocks: a few dozen
#: steps a message, so a million leaves room for conversations of tens of thousands of turns.
STEP_BUDGET = 1_000_000
STEPS_PER_INPUT_ITEM = 1_000
#: Characters (or items) of any one string or list a template builds, and characters of the
#: rendered prompt, per render, plus ``INPUT_SIZE_FACTOR`` times the characters passed in. Real
#: templates write each message once or twice plus a few hundred characters of markup a turn, so
#: 4 million characters over the input is far more than any of them writes.
SIZE_BUDGET = 4_000_000
OUTPUT_BUDGET = 4_000_000
INPUT_SIZE_FACTOR = 2
#: All the strings / lists a render builds, together, may reach this many times the size budget
#: (a real template builds each turn's text a few times over; this bounds the memory a render
#: can hold however it builds its pieces).
TOTAL_SIZE_FACTOR = 16
#: Characters (or items) a call, a filter or an ``in`` test reads for one step: each charges
#: the length of the strings and lists it is handed (its object and arguments) at this rate, so
#: ``s.count('x')`` on a long string inside a loop costs what scanning it costs. A real template
#: reads each message a few times (a few steps per 1,000 characters of conversation).
SCAN_CHARS_PER_STEP = 1_000
#: Bits of an integer ``*`` / ``**`` may build (real templates count messages; 4096 bits is a
#: 1233-digit number).
INT_BITS_BUDGET = 4096


class RenderLimitError(jinja2.exceptions.TemplateError):
    """A chat template passed one of the per-render budgets (the message says which)."""


class _Budget:
    """What one render may still do; see the module docstring."""

    def __init__(self, input_chars: int, input_items: int):
        self.steps_total = self.steps_left = STEP_BUDGET + STEPS_PER_INPUT_ITEM * input_items
        self.size_limit = SIZE_BUDGET + INPUT_SIZE_FACTOR * input_chars
        self.output_limit = OUTPUT_BUDGET + INPUT_SIZE_FACTOR * input_chars
        self.total_left = TOTAL_SIZE_FACTOR * self.size_limit

    def step(self, n: int = 1, what: str = "loop iterations and calls") -> None:
        self.steps_left -= n
        if self.steps_left < 0:
            raise RenderLimitError(f"rendering stopped: {what} passed the limit of "
                                   f"{self.steps_total:,} steps (range elements, loop iterations, "
                                   f"calls, characters read) in one render")

    def scan(self, values: Iterable[Any], what: str) -> None:
        """Charge the characters / items of ``values`` read (:data:`SCAN_CHARS_PER_STEP`)."""
        n = sum(_length(v) for v in values)
        if n >= SCAN_CHARS_PER_STEP:
            self.step(n // SCAN_CHARS_PER_STEP, f"{what} (characters read)")

    def size(self, n: int, what: str) -> None:
        """Refuse building a value of ``n`` characters / items (``what`` names the operation)."""
        if n > self.size_limit:
            raise RenderLimitError(f"rendering stopped: {what} would build {n:,} characters or "
                                   f"items, over the limit of {self.size_limit:,}")
        self.total_left -= n
        if self.total_left < 0:
            raise RenderLimitError(f"rendering stopped: the strings and lists built in one render "
                                   f"pass {TOTAL_SIZE_FACTOR * self.size_limit:,} characters or "
                                   f"items in all")


_current: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("chat_template_budget",
                                                                          default=None)


def _budget() -> _Budget:
    b = _current.get()
    if b is None:   # a render that did not go through _BoundedTemplate: refuse rather than run free
        raise RenderLimitError("rendering stopped: the template is rendered outside a budget")
    return b


def _input_size(value: Any) -> tuple[int, int]:
    """(characters of strings, number of list / dict items) in ``value``, iteratively."""
    chars = items = 0
    stack, seen = [value], 0
    while stack:
        v = stack.pop()
        seen += 1
        if isinstance(v, str):
            chars += len(v)
        elif isinstance(v, dict):
            items += len(v)
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            items += len(v)
            stack.extend(v)
    return chars, items


_COMPARE = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "lt": lambda a, b: a < b,
            "lteq": lambda a, b: a <= b, "gt": lambda a, b: a > b, "gteq": lambda a, b: a >= b,
            "in": lambda a, b: a in b, "notin": lambda a, b: a not in b}


def _length(value: Any) -> int:
    return len(value) if isinstance(value, (str, list, tuple, dict)) else 0


def _check_int(value: Any, what: str) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > INT_BITS_BUDGET:
        raise RenderLimitError(f"rendering stopped: {what} builds an integer of more than "
                               f"{INT_BITS_BUDGET} bits")


def _counted_range(*args: Any) -> Iterable[int]:
    """The templates' ``range``: Python's, each element counted against the render's steps."""
    r = range(*args)
    _budget().step(len(r), "range elements")
    return r


def _counted_iter(iterable: Any) -> Any:
    """Wraps the iterable of every ``{% for %}``: each iteration counts one step."""
    if isinstance(iterable, jinja2.Undefined) or iterable is None:
        return iterable
    budget = _budget()
    if isinstance(iterable, (list, tuple, range, str, dict)):
        budget.step(len(iterable))      # known up front: count it all at once
        return iterable
    return _stepping(budget, iterable)


def _stepping(budget: _Budget, iterable: Any) -> Iterator[Any]:
    for x in iterable:
        budget.step()
        yield x


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_FORMAT_SPEC = re.compile(r"\{[^{}]*?:([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")


def _check_widths(spec_numbers: Iterable[str], star: bool, args: Any, budget: _Budget, what: str):
    """Refuse a format string whose width / precision (literal, or ``*`` / ``{}`` taken from the
    arguments) passes the size limit."""
    for n in spec_numbers:
        if n and n.isdigit():
            budget.size(int(n), what)
    if star:
        vals = args.values() if isinstance(args, dict) else args if isinstance(args, tuple) else (args,)
        for v in vals:
            if isinstance(v, int) and not isinstance(v, bool):
                budget.size(abs(v), what)


def _check_percent(fmt: str, args: Any, budget: _Budget) -> None:
    nums, star = [], False
    for m in _PERCENT_SPEC.finditer(fmt):
        nums += [g for g in m.groups() if g and g != "*"]
        star = star or "*" in m.groups()
    _check_widths(nums, star, args, budget, "'%' formatting")


def _check_format(fmt: str, args: tuple, kwargs: dict, budget: _Budget) -> None:
    nums, nested = [], False
    for m in _FORMAT_SPEC.finditer(fmt):
        nums += re.findall(r"\d+", m.group(1))
        nested = nested or "{" in m.group(1)
    _check_widths(nums, nested, (*args, *kwargs.values()), budget, "str.format")


def _str_method_size(method: Any, args: tuple, kwargs: dict) -> int | None:
    """The length a call of a ``str`` method that can grow a string will return, if known."""
    s, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
    if not isinstance(s, str):
        return None
    if name in ("ljust", "rjust", "center", "zfill") and args and isinstance(args[0], int):
        return max(len(s), args[0])
    if name == "expandtabs":
        tab = args[0] if args and isinstance(args[0], int) else kwargs.get("tabsize", 8)
        return len(s) + s.count("\t") * max(int(tab), 0) if isinstance(tab, int) else None
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        occurrences = s.count(args[0]) if args[0] else len(s) + 1
        if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0:
            occurrences = min(occurrences, args[2])
        return len(s) + occurrences * (len(args[1]) - len(args[0]))
    return None


def _checked_join(sep: str, items: Iterable[Any], what: str) -> str:
    parts = [x if isinstance(x, str) else str(x) for x in items]
    _budget().size(sum(map(len, parts)) + len(sep) * max(len(parts) - 1, 0), what)
    return sep.join(parts)


#: Filters whose integer arguments are widths (the string they build grows with them).
_WIDTH_FILTERS = frozenset(["center", "indent", "tojson"])


def _bounded_filter(name: str, f: Any) -> Any:
    """Wrap filter ``f``: the widths of ``center`` / ``indent`` / ``tojson`` and the sizes
    ``replace`` / ``format`` will build are checked first, and the result's size after."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        values = [a for a in args if not isinstance(a, (jinja2.runtime.Context, jinja2.Environment,
                                                         jinja2.nodes.EvalContext))]
        for a in (*values[1:], *kwargs.values()) if name in _WIDTH_FILTERS else ():
            if isinstance(a, int) and not isinstance(a, bool):
                lines = values[0].count("\n") + 1 if name == "indent" and values and isinstance(values[0], str) else 1
                budget.size(abs(a) * lines, f"filter {name!r}")
        if name == "replace" and len(values) >= 3 and all(isinstance(v, str) for v in values[:3]):
            s, old, new = values[:3]
            budget.size(len(s) + (s.count(old) if old else len(s) + 1) * (len(new) - len(old)),
                        "filter 'replace'")
        elif name == "format" and values and isinstance(values[0], str):
            _check_percent(values[0], tuple(values[1:]) or kwargs, budget)
        budget.scan((*values, *kwargs.values()), f"filter {name!r}")
        result = f(*args, **kwargs)
        budget.size(_length(result), f"filter {name!r}")
        return result
    if hasattr(f, "jinja_pass_arg"):     # keep pass_context / pass_environment markers
        wrapper.jinja_pass_arg = f.jinja_pass_arg
    wrapper._bounded = True
    return wrapper


class _BoundedCodeGenerator(jinja2.compiler.CodeGenerator):
    """Compiles ``a ~ b`` to a join that checks the size first."""

    def visit_Concat(self, node: jinja2.nodes.Concat, frame: Any) -> None:  # noqa: D102
        if frame.eval_ctx.volatile or frame.eval_ctx.autoescape:
            return super().visit_Concat(node, frame)
        self.write("environment.bounded_str_join((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


    def visit_Compare(self, node: jinja2.nodes.Compare, frame: Any) -> None:  # noqa: D102
        if not any(op.op in ("in", "notin") for op in node.ops):
            return super().visit_Compare(node, frame)
        # a chain with an ``in`` test: its operands evaluated in order (as Python does unless a
        # comparison is false early), each ``in`` charged for the container it reads
        self.write("environment.bounded_compare(")
        self.visit(node.expr, frame)
        for op in node.ops:
            self.write(f", {op.op!r}, ")
            self.visit(op.expr, frame)
        self.write(")")


class BoundedTemplate(jinja2.Template):
    """A template whose every ``render`` / ``generate`` runs under a fresh :class:`_Budget`."""

    def render(self, *args: Any, **kwargs: Any) -> str:
        """Render like ``jinja2.Template.render``, within the per-render budgets.

        Raises:
            RenderLimitError: a budget was passed (the message says which).
            jinja2.exceptions.TemplateError: as ``jinja2.Template.render``.
        """
        return "".join(self.generate(*args, **kwargs))

    def generate(self, *args: Any, **kwargs: Any) -> Iterator[str]:
        """Yield the rendered text in pieces, within the per-render budgets.

        Raises:
            RenderLimitError: a budget was passed (the message says which).
        """
        chars, items = _input_size([args, kwargs])
        budget = _Budget(chars, items)
        written = 0
        pieces = super().generate(*args, **kwargs)
        while True:
            token = _current.set(budget)     # set around each step: a generator may be resumed
            try:                             # from another context
                piece = next(pieces, None)
            finally:
                _current.reset(token)
            if piece is None:
                return
            written += len(piece)
            if written > budget.output_limit:
                pieces.close()
                raise RenderLimitError(f"rendering stopped: the output passed "
                                       f"{budget.output_limit:,} characters")
            yield piece


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox chat templates compile in, with the per-render budgets of this module."""

    intercepted_binops = frozenset(["*", "**", "+", "%"])
    code_generator_class = _BoundedCodeGenerator
    template_class = BoundedTemplate

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.globals["range"] = _counted_range
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}
        self.concat = self._bounded_concat

    def bound_filters(self) -> None:
        """Wrap the filters added since construction (call after adding them)."""
        self.filters = {name: f if getattr(f, "_bounded", False) else _bounded_filter(name, f)
                        for name, f in self.filters.items()}

    def _parse(self, source: str, name: str | None, filename: str | None) -> jinja2.nodes.Template:
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(jinja2.nodes.For):   # every loop's iterable counts its steps
            loop.iter = jinja2.nodes.Call(jinja2.nodes.EnvironmentAttribute("counted_iter"),
                                          [loop.iter], [], None, None, lineno=loop.lineno)
        return tree

    @staticmethod
    def counted_iter(iterable: Any) -> Any:
        """The iterable of a ``{% for %}`` loop, each iteration counted as a step.

        Raises:
            RenderLimitError: the loops pass the step budget.
        """
        return _counted_iter(iterable)

    def _bounded_concat(self, pieces: Iterable[str]) -> str:
        return _checked_join("", pieces, "a block of template output")

    def bounded_str_join(self, pieces: Iterable[Any]) -> str:
        """``a ~ b``: the joined length is checked before joining.

        Raises:
            RenderLimitError: the result would pass the size limit.
        """
        return _checked_join("", pieces, "'~'")

    @staticmethod
    def bounded_compare(first: Any, *rest: Any) -> bool:
        """A comparison chain ``first op1 b op2 c ...`` (``rest``: op names and operands in turn,
        Jinja's names: eq, ne, lt, lteq, gt, gteq, in, notin) whose ``in`` / ``not in`` tests
        are charged for the container they read (:data:`SCAN_CHARS_PER_STEP`).

        Raises:
            RenderLimitError: the step budget was passed.
        """
        left = first
        for i in range(0, len(rest), 2):
            op, right = rest[i], rest[i + 1]
            if op in ("in", "notin"):
                _budget().scan((right,), "'in' tests")
            if not _COMPARE[op](left, right):
                return False
            left = right
        return True

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        """``*``, ``**``, ``+`` and ``%`` with the size of the result checked first.

        Raises:
            RenderLimitError: the result would pass the size or integer limits.
        """
        budget = _budget()
        if op == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                budget.size(len(seq) * max(n, 0), "'*'")
        elif op == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            if right > 0 and right * math.log2(abs(left)) > INT_BITS_BUDGET:
                raise RenderLimitError(f"rendering stopped: '**' builds an integer of more than "
                                       f"{INT_BITS_BUDGET} bits")
        elif op == "+" and isinstance(left, (str, list, tuple)) and type(left) is type(right):
            budget.size(len(left) + len(right), "'+'")
        elif op == "%" and isinstance(left, str):
            _check_percent(left, right, budget)
        result = self.binop_table[op](left, right)
        if op in ("*", "**"):
            _check_int(result, repr(op))
        if op in ("%",):
            budget.size(_length(result), "'%'")
        return result

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        """A call from the template: counted as a step, ``str`` methods that grow a string sized
        first, and the result's size checked.

        Raises:
            RenderLimitError: a budget was passed.
            jinja2.exceptions.SecurityError: as the sandbox's ``call``.
        """
        budget = _budget()
        budget.step(1, "calls")
        budget.scan((getattr(__obj, "__self__", None), *args, *kwargs.values()), "calls")
        grown = _str_method_size(__obj, args, kwargs)
        if grown is not None:
            budget.size(grown, f"str.{__obj.__name__}")
        elif getattr(__obj, "__name__", "") == "join" and isinstance(getattr(__obj, "__self__", None), str) \
                and len(args) == 1 and not kwargs:
            return _checked_join(__obj.__self__, args[0], "str.join")
        result = super().call(__context, __obj, *args, **kwargs)
        budget.size(_length(result), "a call")
        return result

    def wrap_str_format(self, value: Any) -> Any:
        """``str.format`` / ``format_map`` in the sandbox, with the widths checked first.

        Raises:
            RenderLimitError: (when the returned function is called) a width passes the limit.
        """
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt = value.__self__

        def checked(*args: Any, **kwargs: Any) -> str:
            mapping = args[0] if value.__name__ == "format_map" and args else kwargs
            _check_format(fmt, args if value.__name__ == "format" else (),
                          mapping if isinstance(mapping, dict) else {}, _budget())
            return wrapped(*args, **kwargs)
        return checked
