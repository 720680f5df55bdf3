"""A small, safe row-filter language for the ``where`` of a federated query.

The text travels from the server to every client, so a client must never execute it: it is
tokenized and parsed here by a recursive-descent parser into a small immutable tree, and the
tree is evaluated with NumPy comparisons. Nothing is passed to ``eval``, ``pandas.query`` or
``DataFrame.eval``; names are only ever used as column keys.

Grammar (keywords are case-insensitive)::

    filter     := or
    or         := and ("or" and)*
    and        := not ("and" not)*
    not        := "not" not | "(" or ")" | comparison
    comparison := column OP literal | column ["not"] "in" "(" literal ("," literal)* [","] ")"
    OP         := "==" | "!=" | "<" | "<=" | ">" | ">="
    column     := NAME | `any name in backticks`
    literal    := number | 'string' | "string" | true | false

Numbers are decimal (``42``, ``-3.5``, ``1e3``); strings take the escapes ``\\\\``, ``\\'``
and ``\\"`` only. A literal must have the kind of its column (a number for a numeric column,
a string for a text or categorical column, true/false for a boolean one), else
:class:`FilterError`.

Missing values never match. Evaluation is three-valued as in SQL: a comparison on a missing
value is *unknown*, ``not unknown`` is unknown, and only rows whose filter is *true* are kept,
so ``not (age > 50)`` keeps neither the rows over 50 nor those with no age.

Limits keep a hostile text cheap: at most ``MAX_TEXT`` characters, ``MAX_DEPTH`` levels of
parentheses and ``not``, and ``MAX_IN_ITEMS`` literals in one ``in`` list.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from collections.abc import Callable
from functools import cached_property
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from pollinate.errors import ConfigError, missing_dependency

if TYPE_CHECKING:
    import pandas as pd

MAX_TEXT = 2000
MAX_DEPTH = 32
MAX_IN_ITEMS = 256
_INT64_MAX = 2**63 - 1

Literal = Union[bool, int, float, str]

COMPARISONS: dict[str, Callable[[Any, Any], Any]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
KEYWORDS = ("and", "or", "not", "in", "true", "false")
_HINT = (
    "write conditions as `column OP literal` (OP: == != < <= > >=) or `column in (1, 2)`, "
    "joined with and / or / not, e.g. age > 50 and sex == 2"
)


class FilterError(ConfigError):
    """A filter text that does not parse, or does not fit the table it is applied to.

    ``position`` is the 0-based character offset of the problem in ``text`` and ``expected``
    says what the parser wanted there.
    """

    def __init__(self, message: str, *, text: str = "", position: int = 0, expected: str = ""):
        super().__init__(message)
        self.text = text
        self.position = position
        self.expected = expected


def load_pandas() -> Any:
    """The ``pandas`` package, or an error saying how to install it."""
    try:
        import pandas
    except ImportError:
        raise missing_dependency("pandas", "analytics") from None
    return pandas


# --- the tree -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Compare:
    """``column OP value``."""

    column: str
    op: str
    value: Literal
    position: int = dataclasses.field(default=0, compare=False)


@dataclasses.dataclass(frozen=True)
class In:
    """``column in (values)``, or ``column not in (values)`` when ``negated``."""

    column: str
    values: tuple[Literal, ...]
    negated: bool = False
    position: int = dataclasses.field(default=0, compare=False)


@dataclasses.dataclass(frozen=True)
class Not:
    """``not operand``."""

    operand: Node


@dataclasses.dataclass(frozen=True)
class And:
    """``parts[0] and parts[1] and ...``."""

    parts: tuple[Node, ...]


@dataclasses.dataclass(frozen=True)
class Or:
    """``parts[0] or parts[1] or ...``."""

    parts: tuple[Node, ...]


Node = Union[Compare, In, Not, And, Or]


@dataclasses.dataclass(frozen=True)
class Filter:
    """A parsed filter: its source ``text`` and its tree ``root``; build it with :func:`parse`."""

    text: str
    root: Node

    @cached_property
    def columns(self) -> frozenset[str]:
        """Every column the filter reads."""
        found: set[str] = set()
        stack: list[Node] = [self.root]
        while stack:
            node = stack.pop()
            if isinstance(node, (Compare, In)):
                found.add(node.column)
            elif isinstance(node, Not):
                stack.append(node.operand)
            else:
                stack.extend(node.parts)
        return frozenset(found)

    def mask(self, table: pd.DataFrame) -> np.ndarray:
        """One bool per row of ``table``: whether the filter is true for it (missing: false)."""
        for column in sorted(self.columns):
            if column not in table.columns:
                raise FilterError(
                    f"the filter reads column {column!r}, which this table does not have; "
                    f"its columns are {', '.join(map(str, table.columns))}",
                    text=self.text,
                )
        true, _ = self._evaluate(self.root, table)
        return true

    def _evaluate(self, node: Node, table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(rows where ``node`` is true, rows where it is false); the rest are unknown."""
        if isinstance(node, Compare):
            self._check_kind(table[node.column], node, (node.value,), node.op)
            present, values = column_values(table[node.column])
            result = np.zeros(len(table), dtype=bool)
            if values.size:
                result[present] = np.asarray(COMPARISONS[node.op](values, node.value), dtype=bool)
            return result, present & ~result
        if isinstance(node, In):
            self._check_kind(table[node.column], node, node.values, "in")
            present, values = column_values(table[node.column])
            member = np.zeros(len(table), dtype=bool)
            if values.size:
                member[present] = np.logical_or.reduce([values == v for v in node.values])
            outside = present & ~member
            return (outside, member) if node.negated else (member, outside)
        if isinstance(node, Not):
            true, false = self._evaluate(node.operand, table)
            return false, true
        results = [self._evaluate(part, table) for part in node.parts]
        trues = [r[0] for r in results]
        falses = [r[1] for r in results]
        if isinstance(node, And):
            return np.logical_and.reduce(trues), np.logical_or.reduce(falses)
        return np.logical_or.reduce(trues), np.logical_and.reduce(falses)

    def _check_kind(
        self, series: pd.Series, node: Compare | In, values: tuple[Literal, ...], op: str
    ) -> None:
        """FilterError unless every literal has the kind of the column (and op suits it)."""
        kind = column_kind(series)
        for value in values:
            self._check_literal(kind, series, node, value, op)

    def _check_literal(
        self, kind: str, series: pd.Series, node: Compare | In, value: Literal, op: str
    ) -> None:
        column, position = node.column, node.position
        wanted = literal_kind(value)
        ordering = op in ("<", "<=", ">", ">=")
        if kind == "empty" or kind == wanted and not (kind == "bool" and ordering):
            return
        if kind == "bool" and wanted == "bool":
            problem = f"{op} does not order booleans; use == or != on column {column!r}"
            expected = "== or !="
        elif kind == "other":
            problem = f"column {column!r} has type {series.dtype}, which filters cannot compare"
            expected = "a column of numbers, strings or booleans"
        else:
            expected = f"a {_KIND_NAMES[kind]} literal"
            problem = (
                f"column {column!r} holds {_KIND_NAMES[kind]}s but is compared with the "
                f"{_KIND_NAMES[wanted]} {value!r}; compare it with {expected}"
            )
        raise FilterError(
            f"{problem} (position {position} of the filter {self.text!r})",
            text=self.text,
            position=position,
            expected=expected,
        )


_KIND_NAMES = {"number": "number", "string": "string", "bool": "boolean"}


def literal_kind(value: Literal) -> str:
    """``number``, ``string`` or ``bool``."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, str):
        return "string"
    return "number"


def column_kind(series: pd.Series) -> str:
    """What a column holds: ``number``, ``string``, ``bool``, ``empty`` (no values) or ``other``."""
    pd = load_pandas()
    types = pd.api.types
    dtype = series.dtype
    if types.is_bool_dtype(dtype):
        return "bool"
    if types.is_numeric_dtype(dtype) and not types.is_complex_dtype(dtype):
        return "number"
    if isinstance(dtype, pd.CategoricalDtype):
        inferred = types.infer_dtype(dtype.categories, skipna=True)
    elif types.is_object_dtype(dtype) or types.is_string_dtype(dtype):
        inferred = types.infer_dtype(series, skipna=True)
    else:
        return "other"
    if inferred in ("integer", "floating", "mixed-integer-float", "decimal"):
        return "number"
    return {"string": "string", "boolean": "bool", "empty": "empty"}.get(inferred, "other")


def column_values(series: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(which rows hold a value, those values as a NumPy array) for comparisons."""
    present = series.notna().to_numpy(dtype=bool)
    values = series[present]
    kind = column_kind(series)
    if kind == "number" and values.dtype.kind in "iu":
        return present, values.to_numpy(dtype=np.int64)
    if kind == "number":
        return present, values.to_numpy(dtype=np.float64)
    if kind == "bool":
        return present, values.to_numpy(dtype=bool)
    return present, values.to_numpy(dtype=object)


# --- the tokenizer ------------------------------------------------------------------------

_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ESCAPES = {"\\": "\\", "'": "'", '"': '"'}


@dataclasses.dataclass(frozen=True)
class Token:
    """One token: ``kind`` (name, number, string, op, keyword, '(', ')', ',', end)."""

    kind: str
    value: Any
    position: int


def tokenize(text: str) -> list[Token]:
    """The tokens of ``text``, ending with an ``end`` token; FilterError on anything else."""
    tokens: list[Token] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c.isspace():
            i += 1
        elif c in "(),":
            tokens.append(Token(c, c, i))
            i += 1
        elif text.startswith(("==", "!=", "<=", ">="), i):
            tokens.append(Token("op", text[i : i + 2], i))
            i += 2
        elif c in "<>":
            tokens.append(Token("op", c, i))
            i += 1
        elif c.isdigit() or c in "+-." and i + 1 < len(text) and _starts_number(text, i):
            i = _number(text, i, tokens)
        elif c in "'\"":
            i = _string(text, i, tokens)
        elif c == "`":
            end = text.find("`", i + 1)
            if end == -1 or end == i + 1 or "\n" in text[i:end]:
                raise _error(text, i, "a column name closed by a backtick on the same line")
            tokens.append(Token("name", text[i + 1 : end], i))
            i = end + 1
        elif match := _NAME.match(text, i):
            word = match.group()
            if word.lower() in KEYWORDS:
                tokens.append(Token("keyword", word.lower(), i))
            else:
                tokens.append(Token("name", word, i))
            i = match.end()
        else:
            hint = "a comparison ==" if c == "=" else "a column, literal, operator or parenthesis"
            raise _error(text, i, hint)
    tokens.append(Token("end", None, len(text)))
    return tokens


def _starts_number(text: str, i: int) -> bool:
    rest = text[i + 1 :] if text[i] in "+-" else text[i:]
    return bool(rest[:1].isdigit() or rest[:1] == "." and rest[1:2].isdigit())


def _number(text: str, i: int, tokens: list[Token]) -> int:
    match = _NUMBER.match(text, i)
    if match is None:
        raise _error(text, i, "a number")
    end = match.end()
    if end < len(text) and (text[end].isalnum() or text[end] in "_.'\"`"):
        raise _error(text, end, "a space, operator or parenthesis after the number")
    word = match.group()
    value: int | float
    if any(ch in word for ch in ".eE"):
        value = float(word)
        if not math.isfinite(value):
            raise _error(text, i, "a finite number")
    else:
        value = int(word)
        if abs(value) > _INT64_MAX:
            raise _error(text, i, f"an integer within ±{_INT64_MAX}")
    tokens.append(Token("number", value, i))
    return end


def _string(text: str, i: int, tokens: list[Token]) -> int:
    quote = text[i]
    chars: list[str] = []
    j = i + 1
    while j < len(text):
        c = text[j]
        if c == quote:
            tokens.append(Token("string", "".join(chars), i))
            return j + 1
        if c == "\\":
            escaped = text[j + 1 : j + 2]
            if escaped not in _ESCAPES:
                raise _error(text, j, "one of the escapes \\\\ \\' \\\" in a string")
            chars.append(_ESCAPES[escaped])
            j += 2
        else:
            chars.append(c)
            j += 1
    raise _error(text, i, f"a closing {quote} for the string that starts here")


def _error(text: str, position: int, expected: str, got: str | None = None) -> FilterError:
    if got is None:
        got = repr(text[position]) if position < len(text) else "the end of the filter"
    start = max(0, position - 40)
    snippet = text[start : position + 40].replace("\n", " ")
    caret = " " * (position - start) + "^"
    return FilterError(
        f"invalid filter: expected {expected} at position {position}, got {got}\n"
        f"    {snippet}\n    {caret}\n{_HINT}",
        text=text,
        position=position,
        expected=expected,
    )


# --- the parser ---------------------------------------------------------------------------


def parse(text: str) -> Filter:
    """Parse a filter text into a :class:`Filter`; FilterError says where and what was wanted."""
    if not isinstance(text, str):
        raise FilterError(f"a filter must be a string, got {type(text).__name__}")
    if len(text) > MAX_TEXT:
        raise FilterError(
            f"the filter is {len(text)} characters long; the limit is {MAX_TEXT}: split the "
            "question into several queries or use shorter `in` lists",
            text=text[:MAX_TEXT],
            position=MAX_TEXT,
            expected="the end of the filter",
        )
    parser = _Parser(text, tokenize(text))
    root = parser.or_()
    parser.expect("end", "and, or, or the end of the filter")
    return Filter(text, root)


class _Parser:
    def __init__(self, text: str, tokens: list[Token]) -> None:
        self.text = text
        self.tokens = tokens
        self.i = 0
        self.depth = 0

    @property
    def token(self) -> Token:
        return self.tokens[self.i]

    def accept(self, kind: str, value: Any = None) -> Token | None:
        token = self.token
        if token.kind == kind and (value is None or token.value == value):
            self.i += 1
            return token
        return None

    def expect(self, kind: str, expected: str, value: Any = None) -> Token:
        token = self.accept(kind, value)
        if token is None:
            raise self.error(expected)
        return token

    def error(self, expected: str) -> FilterError:
        token = self.token
        got = "the end of the filter" if token.kind == "end" else repr(self._source(token))
        return _error(self.text, token.position, expected, got)

    def _source(self, token: Token) -> str:
        following = self.tokens[self.i + 1].position if token.kind != "end" else len(self.text)
        return self.text[token.position : following].strip() or str(token.value)

    def nest(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _error(
                self.text,
                self.token.position,
                f"at most {MAX_DEPTH} nested parentheses or `not`s",
                "one more level",
            )

    def or_(self) -> Node:
        parts = [self.and_()]
        while self.accept("keyword", "or"):
            parts.append(self.and_())
        return parts[0] if len(parts) == 1 else Or(tuple(parts))

    def and_(self) -> Node:
        parts = [self.not_()]
        while self.accept("keyword", "and"):
            parts.append(self.not_())
        return parts[0] if len(parts) == 1 else And(tuple(parts))

    def not_(self) -> Node:
        if self.accept("keyword", "not"):
            self.nest()
            node: Node = Not(self.not_())
            self.depth -= 1
            return node
        if self.accept("("):
            self.nest()
            node = self.or_()
            self.expect(")", "and, or, or a closing parenthesis")
            self.depth -= 1
            return node
        return self.comparison()

    def comparison(self) -> Node:
        name = self.expect("name", "a column name, `not` or an opening parenthesis")
        if op := self.accept("op"):
            return Compare(name.value, op.value, self.literal(), name.position)
        negated = self.accept("keyword", "not") is not None
        if self.accept("keyword", "in") is None:
            expected = "`in`" if negated else "a comparison operator (== != < <= > >=) or `in`"
            raise self.error(f"{expected} after the column {name.value!r}")
        self.expect("(", "an opening parenthesis after `in`")
        values = [self.literal()]
        while self.accept(","):
            if self.token.kind == ")":
                break
            if len(values) == MAX_IN_ITEMS:
                raise self.error(f"at most {MAX_IN_ITEMS} values in one `in` list")
            values.append(self.literal())
        self.expect(")", "a comma or a closing parenthesis")
        return In(name.value, tuple(values), negated, name.position)

    def literal(self) -> Literal:
        token = self.token
        if token.kind in ("number", "string"):
            self.i += 1
            return token.value  # type: ignore[no-any-return]
        if token.kind == "keyword" and token.value in ("true", "false"):
            self.i += 1
            return token.value == "true"
        raise self.error("a literal: a number, a quoted string, true or false")
