"""Writes that lose nothing: temporaries beside the target, replaced only when complete.

Every temporary is created exclusively (``O_EXCL``) and without following links
(``O_NOFOLLOW``), so a planted symlink can neither redirect a write nor be written
through, and a target that is itself a link is refused. A file is replaced with one
``os.replace``; a directory is built complete under a private staging directory, the
old one is renamed aside, the new one renamed in, and only then is the old one
deleted. A reader that finds the target missing but an old copy aside (a writer killed
between those two renames) reads the old copy: see :func:`previous`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, BinaryIO

import numpy as np

from jlora.errors import WriteRefusedError

TMP = ".jlora-tmp-"
OLD = ".jlora-old-"


# JSON files jlora reads (adapter configs, checkpoint metadata) are a few KiB; a larger
# one is refused before it is read, so a link to a huge file cannot exhaust memory.
MAX_JSON_BYTES = 64 << 20


def read_small_file(path: str | os.PathLike, *, what: str) -> bytes:
    """The bytes of a regular file of at most :data:`MAX_JSON_BYTES`.

    A FIFO, a device or a directory is refused before it is opened, so it cannot
    block the reader.

    Raises:
      FileFormatError: not a regular file, or too large.
    """
    from jlora.errors import FileFormatError

    text = os.fspath(path)
    if not os.path.isfile(text):
        raise FileFormatError(text, f"the {what} is not a regular file")
    size = os.path.getsize(text)
    if size > MAX_JSON_BYTES:
        raise FileFormatError(
            text, f"the {what} is {size} bytes; jlora reads at most {MAX_JSON_BYTES}"
        )
    with open(text, "rb") as handle:
        return handle.read(MAX_JSON_BYTES + 1)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _is_or_holds(target: str, source: str) -> bool:
    """Whether writing ``target`` would replace ``source``: the same path, or a parent."""
    target, source = os.path.realpath(target), os.path.realpath(source)
    try:
        return os.path.commonpath([target, source]) == target
    except ValueError:  # different drives
        return False


def check_target(
    target: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (), what: str = "output"
) -> str:
    """``target`` as an absolute path, refused when it is a link or overlaps an input.

    Raises:
      WriteRefusedError: ``target`` is a symbolic link, or it is or holds one of
        ``inputs``.
    """
    text = os.path.abspath(os.fspath(target))
    if os.path.islink(text):
        raise WriteRefusedError(
            f"{what} {text} is a symbolic link; jlora never writes through links "
            "(remove the link or write elsewhere)"
        )
    for source in inputs:
        source = os.fspath(source)
        if os.path.lexists(source) and _is_or_holds(text, source):
            raise WriteRefusedError(
                f"{what} {text} is or holds the input {source}: writing it would destroy "
                "the input; choose another output"
            )
    return text


def _stale(parent: str, name: str, marker: str) -> list[str]:
    prefix = f".{name}{marker}"
    try:
        return [os.path.join(parent, n) for n in os.listdir(parent) if n.startswith(prefix)]
    except OSError:
        return []


def existing(target: str | os.PathLike, *, stacklevel: int = 3) -> str:
    """``target``, or (with a warning) the old copy a replace killed mid-way left aside."""
    text = os.fspath(target)
    old = previous(text)
    if old is None:
        return text
    warnings.warn(
        f"{text} is missing but an interrupted save left its previous version at {old}; "
        "reading that",
        stacklevel=stacklevel,
    )
    return old


def previous(target: str | os.PathLike) -> str | None:
    """The old copy of ``target`` left aside by a replace that was killed mid-way.

    Only when ``target`` itself is missing: then the newest ``.<name>.jlora-old-*``
    beside it, else None.
    """
    text = os.path.abspath(os.fspath(target))
    if os.path.lexists(text):
        return None
    old = _stale(os.path.dirname(text), os.path.basename(text), OLD)
    return max(old, key=os.path.getmtime) if old else None


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def exclusive_file(directory: str, prefix: str) -> tuple[int, str]:
    """A new file in ``directory``, created exclusively, never through a link.

    ``tempfile.mkstemp`` opens with ``O_EXCL | O_NOFOLLOW``; the mode is then set as
    an ordinary file's (``0o666`` less the umask) instead of mkstemp's ``0o600``.
    """
    fd, path = tempfile.mkstemp(prefix=prefix, dir=directory)
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, path


def write_file(
    target: str | os.PathLike,
    write: Callable[[BinaryIO], None],
    *,
    inputs: Iterable[str | os.PathLike] = (),
    what: str = "output",
) -> None:
    """Write ``target`` through ``write(handle)`` into a temporary, then replace it whole."""
    path = check_target(target, inputs=inputs, what=what)
    if os.path.isdir(path):
        raise WriteRefusedError(f"{what} {path} is a directory; expected a file path")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = exclusive_file(parent, f".{os.path.basename(path)}{TMP}")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(parent)


def write_json(target: str | os.PathLike, data: Any, **kwargs: Any) -> None:
    """:func:`write_file` of ``data`` as indented JSON with a final newline."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    write_file(target, lambda handle: handle.write(text.encode()), **kwargs)


def replace_dir(
    target: str | os.PathLike,
    build: Callable[[str], None],
    *,
    replaceable: Callable[[str], bool] | None = None,
    inputs: Iterable[str | os.PathLike] = (),
    what: str = "output",
) -> str:
    """Build a directory at a fresh path with ``build(path)``, then swap it in for ``target``.

    ``build`` gets a path that does not exist yet, inside a private staging directory
    beside ``target``. An existing ``target`` is replaced only when
    ``replaceable(target)`` says jlora wrote it (an empty directory always is).

    Raises:
      WriteRefusedError: ``target`` is a link, a file, overlaps an input, or exists
        and is not ``replaceable``.
    """
    path = check_target(target, inputs=inputs, what=what)
    parent, name = os.path.split(path)
    if os.path.lexists(path):
        if not os.path.isdir(path):
            raise WriteRefusedError(f"{what} {path} exists and is not a directory")
        if os.listdir(path) and (replaceable is None or not replaceable(path)):
            raise WriteRefusedError(
                f"{what} {path} exists and holds files jlora did not write; refusing to "
                "replace it (remove it yourself or choose another output)"
            )
    os.makedirs(parent, exist_ok=True)
    for stale in _stale(parent, name, TMP):
        shutil.rmtree(stale, ignore_errors=True)
    staging = tempfile.mkdtemp(prefix=f".{name}{TMP}", dir=parent)  # 0o700, exclusive
    fresh = os.path.join(staging, name)
    try:
        build(fresh)
        if not os.path.isdir(fresh):
            raise RuntimeError(f"internal: nothing was written at {fresh}")
        os.chmod(fresh, 0o777 & ~_umask())
        old = None
        if os.path.lexists(path):
            old = os.path.join(parent, f".{name}{OLD}{secrets.token_hex(6)}")
            os.rename(path, old)
        os.rename(fresh, path)
        _fsync_dir(parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for stale in _stale(parent, name, OLD):
        shutil.rmtree(stale, ignore_errors=True)
    return path


# -- safetensors, streamed ------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
}


def write_safetensors(
    handle: BinaryIO, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> None:
    """Stream ``tensors`` to ``handle`` in the safetensors format, one array at a time.

    Same bytes layout as ``safetensors.numpy.save`` (an 8-byte little-endian header
    length, a JSON header padded to 8 bytes, then each array's little-endian bytes),
    without holding a second copy of the whole file in memory.
    """
    arrays = {}
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        dtype = _SAFETENSORS_DTYPES.get(str(array.dtype))
        if dtype is None:
            raise TypeError(f"safetensors cannot store {name!r} of dtype {array.dtype}")
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        array = np.ascontiguousarray(array)
        arrays[name] = array
        header[name] = {
            "dtype": dtype,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    handle.write(len(text).to_bytes(8, "little"))
    handle.write(text)
    for array in arrays.values():
        if array.nbytes:
            handle.write(memoryview(array.reshape(-1).view(np.uint8)))
