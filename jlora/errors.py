"""jlora's own exception types: every bad file, refused write or damaged checkpoint.

Each subclasses the built-in type older jlora versions raised (``ValueError`` or
``FileNotFoundError``), so ``except ValueError`` keeps working, and all of them
subclass :class:`JloraError`, so one ``except jlora.JloraError`` catches every refusal
jlora makes about files.

Errors about a file name the file; errors about a value read from it also name the
key, what was expected and what was found. When the file was reached through a
symbolic link the found value is left out, so a planted link cannot make an error
message print the contents of the file it points to.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = [
    "DamagedCheckpointError",
    "FileFormatError",
    "JloraError",
    "MissingFileError",
    "WriteRefusedError",
]

_FOUND_LIMIT = 120
_UNSET = object()


class JloraError(Exception):
    """The base class of jlora's errors about files and writes.

    Example:
      >>> import jlora
      >>> issubclass(jlora.FileFormatError, jlora.JloraError)
      True
    """


def through_link(file: str | os.PathLike) -> bool:
    """Whether ``file`` (or a directory on its way) is reached through a symbolic link."""
    try:
        text = os.fspath(file)
        return os.path.realpath(text) != os.path.abspath(text)
    except (OSError, ValueError, TypeError):
        return True


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _FOUND_LIMIT else text[: _FOUND_LIMIT - 3] + "..."


class FileFormatError(JloraError, ValueError):
    """A file jlora reads holds a value it refuses: malformed, truncated or inconsistent.

    Attributes:
      file: the file (or directory) read.
      key: where in the file (a JSON key, a tensor name), or None.
      expected: what jlora expected there, or None.
      found: what it found (None when hidden because the file is a link).

    Example:
      >>> import jlora
      >>> error = jlora.FileFormatError("a/adapter_config.json", key="r",
      ...                               expected="a positive integer", found=-1)
      >>> str(error)
      "a/adapter_config.json: 'r': expected a positive integer, found -1"
      >>> isinstance(error, ValueError)
      True
    """

    def __init__(
        self,
        file: str | os.PathLike,
        message: str | None = None,
        *,
        key: str | None = None,
        expected: str | None = None,
        found: Any = _UNSET,
    ):
        self.file = os.fspath(file)
        self.key = key
        self.expected = expected
        hidden = through_link(self.file)
        self.found = None if hidden or found is _UNSET else found
        parts = [self.file]
        if message:
            parts.append(message)
        if key is not None:
            parts.append(repr(key))
        if expected is not None:
            what = f"expected {expected}"
            if hidden and found is not _UNSET:
                what += " (the value found is not shown: the file is reached through a link)"
            elif found is not _UNSET:
                what += f", found {_short(found)}"
            parts.append(what)
        super().__init__(": ".join(parts))


class DamagedCheckpointError(FileFormatError):
    """A jlora checkpoint step is damaged: a missing or corrupt array file, or edited metadata.

    Attributes:
      step: the step (None for a checkpoint saved without ``step=``).
      entry: the adapter path whose arrays are damaged, or None when the damage is
        not confined to one entry.

    Example:
      >>> import jlora
      >>> error = jlora.DamagedCheckpointError("run/7", "checksum mismatch", step=7,
      ...                                      entry="dense/kernel")
      >>> error.step, error.entry
      (7, 'dense/kernel')
    """

    def __init__(
        self,
        file: str | os.PathLike,
        message: str | None = None,
        *,
        step: int | None = None,
        entry: str | None = None,
        **kwargs: Any,
    ):
        self.step = step
        self.entry = entry
        where = "checkpoint" if step is None else f"step {step}"
        if entry is not None:
            where += f", entry {entry!r}"
        text = f"{where} is damaged" + (f": {message}" if message else "")
        super().__init__(file, text, **kwargs)


class MissingFileError(JloraError, FileNotFoundError):
    """A file or checkpoint jlora was asked to read is not there.

    Example:
      >>> import jlora
      >>> issubclass(jlora.MissingFileError, FileNotFoundError)
      True
    """


class WriteRefusedError(JloraError, ValueError):
    """jlora refuses a write that could destroy data it did not write.

    Raised for an output that is the input, an existing target that jlora did not
    write (``overwrite`` replaces only jlora's own files), or a path through a
    symbolic link.

    Example:
      >>> import jlora
      >>> issubclass(jlora.WriteRefusedError, ValueError)
      True
    """
