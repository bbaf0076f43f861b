"""Recipe patterns are matched against every tensor name, so a pattern must not backtrack
catastrophically. Python's `re` has no timeout; instead the pattern's shape is bounded.

Exponential backtracking needs a repeat whose iterations can split one string in more than one
way. A repeat run more than once is refused when its body can match the empty string (`(a*)*`),
or when, inside the body, two alternatives can start at the same character (`(a|a)*b`,
`(a|aa)*X`) or an inner repeat can go on with the character that would follow it (`(.+)+X`,
`(\\w+\\s?)+`). Harmless repeats pass: `(q|k)+`, `(gate|up)_proj+`, `(\\.\\d+)+`, `(\\w+\\.)+`.
Separate repeats (`.*a.*b.*`) cost n^k for k unbounded repeats on a name of n characters, so k
is capped: with k ≤ 3 and tensor names of a few hundred characters, one match takes at most a
few million steps (milliseconds).
"""

from __future__ import annotations

import re

try:  # Python 3.11 renamed sre_parse and sre_compile
    from re import _compiler as sre_compile
    from re import _parser as sre_parse
except ImportError:  # pragma: no cover
    import sre_compile  # type: ignore[no-redef]
    import sre_parse  # type: ignore[no-redef]

from nvq.errors import RecipeError

MAX_PATTERN_CHARS = 512
MAX_UNBOUNDED_REPEATS = 3
# A bounded repeat `x{0,N}` is as costly as an unbounded one once N is this large.
_SMALL_REPEAT = 16

_REPEATS = {sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT, getattr(sre_parse, "POSSESSIVE_REPEAT", None)} - {None}
_ONE_CHAR = {sre_parse.LITERAL, sre_parse.NOT_LITERAL, sre_parse.ANY, sre_parse.IN}
_ZERO_WIDTH = {sre_parse.AT, sre_parse.ASSERT, sre_parse.ASSERT_NOT}
# Character sets are compared on ASCII plus stand-ins for the rest: tensor names are ASCII.
_ALPHABET = tuple(chr(i) for i in range(128)) + ("é", "\u2581", "\u4e2d")
_ANY_CHAR = frozenset(_ALPHABET)


def compile_pattern(pattern: str, where: str) -> re.Pattern[str]:
    """`pattern` compiled, or a RecipeError naming `where` and why it is refused."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise RecipeError(f"{where}: match is {len(pattern)} characters long; at most {MAX_PATTERN_CHARS} are allowed.")
    try:
        compiled = re.compile(pattern)
        tree = sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise RecipeError(f"{where}: match {pattern!r} is not a valid regex ({e}).") from None
    why = _exponential(tree, tree.state)
    if why:
        raise RecipeError(f"{where}: match {pattern!r} repeats a group {why}, which can take exponential time; "
                          "rewrite it so that each repetition can match in one way only.")
    unbounded = _count_unbounded(tree)
    if unbounded > MAX_UNBOUNDED_REPEATS:
        raise RecipeError(f"{where}: match {pattern!r} has {unbounded} open-ended repeats; at most "
                          f"{MAX_UNBOUNDED_REPEATS} are allowed, so matching stays fast.")
    return compiled


def _exponential(items, state) -> str | None:
    """Why some repeat of the parsed pattern (run more than once) can split one string into
    iterations in several ways, or None."""
    for op, arg in items:
        if op in _REPEATS and arg[1] > 1:
            body = arg[2]
            first, nullable = _first(body, state)
            if nullable:
                return "whose body can match the empty string"
            # inside one iteration, what follows the body's end is the next iteration
            why = _ambiguous(body, first, state)
            if why:
                return why
        for sub in _children(op, arg):
            why = _exponential(sub, state)
            if why:
                return why
    return None


def _ambiguous(items, follow: frozenset, state) -> str | None:
    """Inside a repeated body: an alternation whose alternatives can start at the same character,
    or an inner repeat that can either go on or stop at the same character. `follow`: the
    characters that can come after `items`."""
    for i, (op, arg) in enumerate(items):
        rest, rest_nullable = _first(items[i + 1:], state)
        after = rest | follow if rest_nullable else rest
        if op in _REPEATS:
            low, high, body = arg
            first, _ = _first(body, state)
            if high > low and first & after:
                return "holding a repeat that can stop or go on at the same character"
            why = _ambiguous(body, first | after, state)
        elif op is sre_parse.BRANCH:
            why = _overlapping(arg[1], after, state)
        else:
            why = next(filter(None, (_ambiguous(sub, after, state) for sub in _children(op, arg))), None)
        if why:
            return why
    return None


def _overlapping(alternatives, after: frozenset, state) -> str | None:
    starts, empties = [], 0
    for alt in alternatives:
        first, nullable = _first(alt, state)
        empties += nullable
        starts.append(first | after if nullable else first)
        why = _ambiguous(alt, after, state)
        if why:
            return why
    clash = empties > 1 or any(a & b for i, a in enumerate(starts) for b in starts[i + 1:])
    return "holding alternatives that can match at the same position" if clash else None


def _first(items, state) -> tuple[frozenset, bool]:
    """(characters a match of `items` can start with, whether it can match the empty string)."""
    out: frozenset = frozenset()
    for op, arg in items:
        if op in _ONE_CHAR:
            return out | _chars(op, arg, state), False
        if op in _ZERO_WIDTH:
            continue
        if op in _REPEATS:
            first, nullable = _first(arg[2], state)
            nullable = nullable or arg[0] == 0
        elif op is sre_parse.BRANCH:
            parts = [_first(alt, state) for alt in arg[1]]
            first = frozenset().union(*(p[0] for p in parts))
            nullable = any(p[1] for p in parts)
        elif op in (sre_parse.SUBPATTERN, getattr(sre_parse, "ATOMIC_GROUP", None), sre_parse.GROUPREF_EXISTS):
            parts = [_first(sub, state) for sub in _children(op, arg)]
            first = frozenset().union(*(p[0] for p in parts))
            nullable = any(p[1] for p in parts) or op is sre_parse.GROUPREF_EXISTS
        else:  # a back-reference: anything, or nothing
            first, nullable = _ANY_CHAR, True
        out |= first
        if not nullable:
            return out, False
    return out, True


def _chars(op, arg, state) -> frozenset:
    """The characters of _ALPHABET that one single-character node matches (under the pattern's
    flags), found by compiling the node alone."""
    node = sre_compile.compile(sre_parse.SubPattern(state, [(op, arg)]), state.flags)
    return frozenset(c for c in _ALPHABET if node.fullmatch(c))


def _count_unbounded(items) -> int:
    count = 0
    for op, arg in items:
        if op in _REPEATS:
            count += arg[1] - arg[0] > _SMALL_REPEAT
        for sub in _children(op, arg):
            count += _count_unbounded(sub)
    return count


def _children(op, arg) -> list:
    """The sub-patterns of one parsed node."""
    if op in _REPEATS:
        return [arg[2]]
    if op is sre_parse.SUBPATTERN:
        return [arg[-1]]
    if op is sre_parse.BRANCH:
        return list(arg[1])
    if op in (sre_parse.ASSERT, sre_parse.ASSERT_NOT):
        return [arg[1]]
    if op is getattr(sre_parse, "ATOMIC_GROUP", None):
        return [arg]
    if op is sre_parse.GROUPREF_EXISTS:
        return [a for a in arg[1:] if a is not None]
    return []
