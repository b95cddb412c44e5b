"""Regexes that cannot hang: RE2 (linear time) for every pattern, Python ``re`` only for code.

Patterns read from files (PEFT's ``rank_pattern``, ``alpha_pattern`` and string
``target_modules``; the spec in a jlora checkpoint) are matched with RE2, whose time is
linear in the text, so a crafted pattern cannot make a reader backtrack for hours.
Patterns written in the user's own code are matched with RE2 too when RE2 accepts
them; one that needs Python-only syntax (look-arounds, back-references) falls back to
Python's ``re``, which is the user's own choice of risk.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Protocol

import re2

from jlora.errors import FileFormatError

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False
# A pattern RE2 would need more than this to compile is refused, not slowly matched.
_OPTIONS.max_mem = 8 << 20


class Pattern(Protocol):
    def fullmatch(self, text: str) -> Any: ...

    def match(self, text: str) -> Any: ...

    def search(self, text: str) -> Any: ...


def _message(error: Exception) -> str:
    text = error.args[0] if error.args else str(error)
    return text.decode(errors="replace") if isinstance(text, bytes) else str(text)


@functools.lru_cache(maxsize=4096)
def _compile_re2(pattern: str) -> Any:
    return re2.compile(pattern, options=_OPTIONS)


@functools.lru_cache(maxsize=4096)
def _compile_python(pattern: str) -> Any:
    return re.compile(pattern)


def compile_trusted(pattern: str, *, what: str) -> Pattern:
    """A pattern from the user's code: RE2 when it can, else Python ``re``.

    Raises:
      ValueError: ``pattern`` is not a valid regex (``what`` names where it came from).
    """
    if not isinstance(pattern, str):
        raise TypeError(f"{what}: expected a regex string; found {type(pattern).__name__}")
    try:
        return _compile_re2(pattern)
    except re2.error:
        pass
    try:
        return _compile_python(pattern)
    except re.error as error:
        raise ValueError(f"{what}: {pattern!r} is not a valid regex: {error}") from None


def linear_time(pattern: str) -> bool:
    """Whether RE2 accepts ``pattern`` (so it can be matched in linear time)."""
    try:
        _compile_re2(pattern)
    except re2.error:
        return False
    return True


def compile_untrusted(pattern: Any, *, file: str | os.PathLike, key: str) -> Pattern:
    """A pattern read from ``file`` at ``key``: RE2 only.

    Raises:
      FileFormatError: not a string, not valid, or uses syntax RE2 cannot match in
        linear time (look-arounds, back-references), or too large.
    """
    if not isinstance(pattern, str):
        raise FileFormatError(file, key=key, expected="a regex string", found=pattern)
    try:
        return _compile_re2(pattern)
    except re2.error as error:
        raise FileFormatError(
            file,
            f"({_message(error)}; jlora matches regexes from files with RE2, in linear "
            "time, so look-arounds and back-references are not accepted)",
            key=key,
            expected="a valid RE2 regex",
            found=pattern,
        ) from None


def peft_match(compiled_key: str) -> str:
    """PEFT's per-module pattern rule, ``(.*\\.)?(key)$``, as one regex."""
    return rf"(.*\.)?({compiled_key})$"
