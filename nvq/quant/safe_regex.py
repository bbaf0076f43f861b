"""Recipe patterns are matched against every tensor name, so a pattern must not backtrack
catastrophically. Python's `re` has no timeout; instead the pattern's shape is bounded.

Exponential backtracking needs a repeat that holds another repeat or an alternation, e.g.
`(.+)+X` or `(a|ab)*`; those are refused. Separate repeats (`.*a.*b.*`) cost n^k for k
unbounded repeats on a name of n characters, so k is capped: with k ≤ 3 and tensor names of a
few hundred characters, one match takes at most a few million steps (milliseconds).
"""

from __future__ import annotations

import re

try:  # Python 3.11 renamed sre_parse
    from re import _parser as sre_parse
except ImportError:  # pragma: no cover
    import sre_parse  # type: ignore[no-redef]

from nvq.errors import RecipeError

MAX_PATTERN_CHARS = 512
MAX_UNBOUNDED_REPEATS = 3
# A bounded repeat `x{0,N}` is as costly as an unbounded one once N is this large.
_SMALL_REPEAT = 16

_REPEATS = {sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT, getattr(sre_parse, "POSSESSIVE_REPEAT", None)} - {None}


def compile_pattern(pattern: str, where: str) -> re.Pattern[str]:
    """`pattern` compiled, or a RecipeError naming `where` and why it is refused."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise RecipeError(f"{where}: match is {len(pattern)} characters long; at most {MAX_PATTERN_CHARS} are allowed.")
    try:
        compiled = re.compile(pattern)
        tree = sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise RecipeError(f"{where}: match {pattern!r} is not a valid regex ({e}).") from None
    unbounded = _check(tree, where, pattern)
    if unbounded > MAX_UNBOUNDED_REPEATS:
        raise RecipeError(f"{where}: match {pattern!r} has {unbounded} open-ended repeats; at most "
                          f"{MAX_UNBOUNDED_REPEATS} are allowed, so matching stays fast.")
    return compiled


def _check(items, where: str, pattern: str) -> int:
    """Count the open-ended repeats in a parsed pattern; refuse a repeat nested in a repeat and an
    alternation inside a repeat (the two shapes that backtrack exponentially)."""
    count = 0
    for op, arg in items:
        if op in _REPEATS:
            low, high, sub = arg
            # `x?` runs its body at most once, so only a body run many times can blow up.
            if high > 1 and _is_repeat_or_branch(sub):
                raise RecipeError(f"{where}: match {pattern!r} repeats a group that itself repeats or "
                                  "alternates, which can take exponential time; rewrite it without nesting.")
            count += high - low > _SMALL_REPEAT
            count += _check(sub, where, pattern)
        else:
            for sub in _children(op, arg):
                count += _check(sub, where, pattern)
    return count


def _is_repeat_or_branch(items) -> bool:
    for op, arg in items:
        if op in _REPEATS or op is sre_parse.BRANCH:
            return True
        if any(_is_repeat_or_branch(sub) for sub in _children(op, arg)):
            return True
    return False


def _children(op, arg) -> list:
    """The sub-patterns of one parsed node."""
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
