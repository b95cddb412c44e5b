"""Orbax checkpoints of the adapters tree, with the spec and layouts as JSON.

A checkpoint holds two Orbax items: ``adapters`` (a PyTree item with the factors and
trainable copies, nested by the components of their paths) and ``jlora`` (JSON: the
spec, and per path the kind, scale, dropout, layout, rank and dtypes). The base model
is never written: a checkpoint is the adapters' bytes plus a few KiB.

``save(directory, ...)`` writes one checkpoint at ``directory``; ``save(directory, ...,
step=n)`` writes step ``n`` under ``directory`` with an Orbax ``CheckpointManager``
(keeping the last ``max_to_keep``). Orbax writes every checkpoint to a temporary
directory and renames it when complete, so a save killed mid-way never leaves a step
that looks complete: ``load`` skips it (or, asked for that step, says it is incomplete).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jlora import _io
from jlora._adapter import KINDS, Layout, LoraAdapter, is_adapter
from jlora._paths import describe, path_str, shape_of
from jlora._regex import linear_time
from jlora._spec import LoraSpec
from jlora._tree import adapter_items
from jlora._types import Adapters, Path, is_int, is_real
from jlora.errors import DamagedCheckpointError, FileFormatError, MissingFileError

__all__ = ["load", "read_metadata", "resolve", "save"]

FORMAT = "jlora.checkpoint"
VERSION = 1
ARRAYS_ITEM = "adapters"
METADATA_ITEM = "jlora"
_ITEMS = (ARRAYS_ITEM, METADATA_ITEM)


# -- saving ---------------------------------------------------------------------------


def save(
    directory: str | os.PathLike,
    adapters: Adapters,
    spec: LoraSpec,
    *,
    step: int | None = None,
    max_to_keep: int | None = None,
    overwrite: bool = False,
) -> epath.Path:
    """Write the adapters tree and its spec as an Orbax checkpoint.

    Only the adapters are written (factors and trainable copies of base leaves), with
    the spec and every adapter's layout, scale and dropout as JSON metadata. Arrays
    keep their dtype; sharded arrays are written from their shards. The call returns
    when the checkpoint is complete on disk.

    Args:
      directory: where to write. Without ``step`` the checkpoint is ``directory``
        itself; with ``step`` it is a step directory under it.
      adapters: the adapters tree from :func:`jlora.init` (or training).
      spec: the spec the adapters were made with. A callable ``targets`` cannot be
        stored: its name is kept and, on load, the spec targets the saved paths.
      step: a training step: write through an Orbax ``CheckpointManager``.
      max_to_keep: with ``step``, keep only the newest ``max_to_keep`` steps.
      overwrite: replace an existing checkpoint (same ``directory``, or same
        ``step``). The new one is written complete beside the old one, which is
        deleted only after the new one has taken its place; a directory that is not
        a jlora checkpoint is never replaced.

    Returns:
      The path of the checkpoint written (``directory`` or its step directory).

    Raises:
      ValueError: the checkpoint exists and ``overwrite`` is False, ``adapters``
        holds no adapter, ``max_to_keep`` is not a positive integer, or
        ``directory`` holds checkpoints of the other kind (steps versus a single
        checkpoint).
      jlora.WriteRefusedError: ``directory`` is a symbolic link, or ``overwrite``
        would replace a directory that is not a jlora checkpoint.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, jlora
      >>> from jlora import checkpoint
      >>> params = {"dense": {"kernel": jnp.ones((6, 4))}}
      >>> spec = jlora.LoraSpec(rank=2, targets=["dense"])
      >>> adapters = jlora.init(spec, params, jax.random.key(0))
      >>> path = checkpoint.save(tempfile.mkdtemp() + "/run", adapters, spec, step=10)
      >>> path.name
      '10'
    """
    if not isinstance(spec, LoraSpec):
        raise TypeError(f"save: expected a jlora.LoraSpec as spec; found {type(spec).__name__}")
    items = adapter_items(adapters)
    if not items:
        raise ValueError("save: the adapters tree holds no adapter or trainable leaf")
    arrays = _nest({path: _arrays_of(node) for path, node in items})
    metadata = _metadata(items, spec)
    args = ocp.args.Composite(
        **{
            ARRAYS_ITEM: ocp.args.PyTreeSave(arrays),
            METADATA_ITEM: ocp.args.JsonSave(metadata),
        }
    )
    root = _as_path(directory)
    if max_to_keep is not None and (not is_int(max_to_keep) or max_to_keep < 1):
        raise ValueError(
            f"save: max_to_keep must be a positive integer or None (keep every step); found "
            f"{max_to_keep!r}"
        )
    local = "://" not in str(root)
    if local:
        _io.check_target(str(root), what="save: checkpoint directory")
    if step is None:
        if _step_paths(root):
            raise ValueError(
                f"save: {str(root)!r} holds step checkpoints {sorted(_step_paths(root))}; "
                "pass step= to add one, or save to another directory"
            )
        if root.exists() and not overwrite:
            raise ValueError(
                f"save: {str(root)!r} already exists; pass overwrite=True to replace it, "
                "or step= to keep several checkpoints"
            )
        if local:
            _write_replacing(root, args)
        else:
            with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
                checkpointer.save(root, args=args, force=overwrite)
        return root
    step = _check_step(step)
    if _is_checkpoint(root):
        raise ValueError(
            f"save: {str(root)!r} is a single checkpoint (saved without step=); steps "
            "need a directory of their own"
        )
    if local and (root / str(step)).exists():
        if not overwrite:
            raise ValueError(
                f"save: step {step} already exists in {str(root)!r}; pass "
                "overwrite=True to replace it"
            )
        # The old step stays whole until the new one is complete (Orbax's own
        # overwrite deletes it first).
        _io.check_target(str(root / str(step)), what="save: step directory")
        _write_replacing(root / str(step), args)
        return root / str(step)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True
    )
    with ocp.CheckpointManager(root, options=options, item_names=_ITEMS) as manager:
        if step in manager.all_steps():
            if not overwrite:
                raise ValueError(
                    f"save: step {step} already exists in {str(root)!r}; pass "
                    "overwrite=True to replace it"
                )
            manager.delete(step)
        manager.save(step, args=args, force=True)
        manager.wait_until_finished()
    return root / str(step)


def _write_replacing(path: epath.Path, args: Any) -> None:
    """Write a checkpoint at ``path``, replacing one there only once the new one is complete."""

    def build(fresh: str) -> None:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            checkpointer.save(epath.Path(fresh), args=args)

    _io.replace_dir(
        str(path),
        build,
        replaceable=lambda existing: _is_checkpoint(epath.Path(existing)),
        what="save: checkpoint",
    )


def _arrays_of(node: Any) -> Any:
    if isinstance(node, LoraAdapter):
        return node.arrays()
    return node


def _nest(flat: Mapping[Path, Any]) -> dict[str, Any]:
    """``{"a/b/c": x}`` -> ``{"a": {"b": {"c": x}}}``."""
    nested: dict[str, Any] = {}
    for path, value in flat.items():
        parts = path.split("/")
        for part in parts:
            if not part or "." in part:
                raise ValueError(
                    f"save: cannot store the leaf at {path!r}: path component {part!r} "
                    "is empty or holds a '.', which Orbax uses as a separator"
                )
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def _leaf(nested: Mapping[str, Any], path: Path) -> Any:
    node: Any = nested
    for part in path.split("/"):
        node = node[part]
    return node


def _metadata(items: list[tuple[Path, Any]], spec: LoraSpec) -> dict[str, Any]:
    entries = []
    for path, node in items:
        if isinstance(node, LoraAdapter):
            entries.append(
                {
                    "path": path,
                    "kind": node.KIND,
                    "rank": node.rank,
                    "scale": float(node.scale),
                    "dropout": float(node.dropout),
                    "layout": node.layout.to_dict(),
                    "dtype": {
                        name: str(jnp.dtype(array.dtype)) for name, array in node.arrays().items()
                    },
                    "crc32": _checksums(node.arrays()),
                    **{name: _meta_json(getattr(node, name)) for name in node.EXTRA_META},
                }
            )
        else:
            entries.append(
                {
                    "path": path,
                    "kind": "trainable",
                    "shape": list(shape_of(node)),
                    "dtype": str(jnp.dtype(node.dtype)),
                    "crc32": _checksums({"value": node}),
                }
            )
    return {
        "format": FORMAT,
        "version": VERSION,
        "spec": spec.to_dict(),
        "entries": entries,
        "bytes": sum(_nbytes(x) for _, n in items for x in jax.tree_util.tree_leaves(n)),
    }


def _checksums(arrays: Mapping[str, Any]) -> dict[str, int] | None:
    """CRC-32 of each array's bytes, so a load notices a corrupted array file.

    None when an array is not fully addressable from this process (a multi-host
    sharded array): then only Orbax's own checks apply.
    """
    out = {}
    for name, array in arrays.items():
        if isinstance(array, jax.Array) and not array.is_fully_addressable:
            return None
        out[name] = _crc32(array)
    return out


def _crc32(array: Any) -> int:
    return zlib.crc32(np.ascontiguousarray(np.asarray(array)).view(np.uint8))


def _nbytes(array: Any) -> int:
    return math.prod(shape_of(array)) * jnp.dtype(array.dtype).itemsize


def _check_step(step: Any) -> int:
    if not is_int(step) or step < 0:
        raise ValueError(f"step must be a non-negative integer; found {step!r}")
    return int(step)


# -- finding checkpoints --------------------------------------------------------------


def _as_path(directory: str | os.PathLike) -> epath.Path:
    """An absolute path (Orbax needs one); remote URLs such as ``gs://`` stay as they are."""
    text = os.fspath(directory)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def _is_checkpoint(path: epath.Path) -> bool:
    """A complete single checkpoint (or step directory) written by :func:`save`."""
    return (path / METADATA_ITEM).is_dir() and (path / ARRAYS_ITEM).is_dir()


def _step_paths(root: epath.Path) -> dict[int, epath.Path]:
    """Complete step checkpoints under ``root``, by step."""
    if not root.is_dir():
        return {}
    found = {}
    for child in root.iterdir():
        if child.name.isdigit() and _is_checkpoint(child):
            if not ocp.step.is_path_temporary(child):
                found[int(child.name)] = child
    return found


def _interrupted(root: epath.Path) -> list[str]:
    """Names of temporary (unfinished) checkpoint directories in and beside ``root``."""
    names = []
    if root.is_dir():
        names += [c.name for c in root.iterdir() if ocp.step.TMP_DIR_SUFFIX in c.name]
    if root.parent.is_dir():
        prefix = root.name + ocp.step.TMP_DIR_SUFFIX
        names += [c.name for c in root.parent.iterdir() if c.name.startswith(prefix)]
    return sorted(names)


def resolve(directory: str | os.PathLike, *, step: int | None = None) -> epath.Path:
    """The checkpoint directory :func:`load` would read.

    ``directory`` is a checkpoint written without ``step`` (or a step directory), or
    a directory of steps: then ``step`` picks one, and without it the newest complete
    step is taken. Steps whose save did not finish are never chosen.

    Raises:
      jlora.MissingFileError: no complete checkpoint is there; the message says what
        was found instead (an interrupted save, other steps, another kind of file).
        It subclasses ``FileNotFoundError``.
      jlora.DamagedCheckpointError: the checkpoint or step asked for lacks an item.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, jlora
      >>> from jlora import checkpoint
      >>> params = {"w": jnp.ones((4, 4))}
      >>> spec = jlora.LoraSpec(rank=1, targets="w")
      >>> adapters = jlora.init(spec, params, jax.random.key(0))
      >>> root = tempfile.mkdtemp()
      >>> for step in (1, 2):
      ...     _ = checkpoint.save(root, adapters, spec, step=step)
      >>> checkpoint.resolve(root).name
      '2'
    """
    root = _as_path(directory)
    if "://" not in str(root):
        root = epath.Path(_io.existing(str(root)))
    steps = _step_paths(root)
    if step is not None:
        step = _check_step(step)
        if step in steps:
            return steps[step]
        pending = [n for n in _interrupted(root) if n.split(".", 1)[0] == str(step)]
        if pending:
            raise MissingFileError(
                f"step {step} in {str(root)!r} is incomplete: its save was interrupted "
                f"(found {pending[0]!r}). Complete steps: {sorted(steps) or 'none'}"
            )
        if (root / str(step)).is_dir():
            raise DamagedCheckpointError(
                str(root / str(step)), _missing_items(root / str(step)), step=step
            )
        raise MissingFileError(
            f"no step {step} in {str(root)!r}; complete steps: {sorted(steps) or 'none'}"
        )
    if _is_checkpoint(root) and not ocp.step.is_path_temporary(root):
        return root
    if steps:
        return steps[max(steps)]
    pending = _interrupted(root)
    if pending:
        raise MissingFileError(
            f"no complete jlora checkpoint at {str(root)!r}: a save there was "
            f"interrupted (found {pending[0]!r}) and no earlier one is complete"
        )
    if not root.exists():
        raise MissingFileError(f"no jlora checkpoint at {str(root)!r}: it does not exist")
    if (root / "adapter_config.json").exists():
        raise MissingFileError(
            f"{str(root)!r} is a Hugging Face PEFT adapter, not an Orbax checkpoint: read "
            "it with jlora.peft.load"
        )
    if (root / METADATA_ITEM).is_dir() or (root / ARRAYS_ITEM).is_dir():
        raise DamagedCheckpointError(str(root), _missing_items(root))
    raise MissingFileError(
        f"no jlora checkpoint at {str(root)!r}: expected the items {list(_ITEMS)} (a "
        "checkpoint written by jlora.save) or numbered step directories holding them"
    )


def _missing_items(path: epath.Path) -> str:
    return f"its item(s) {[item for item in _ITEMS if not (path / item).is_dir()]} are missing"


def _metadata_file(path: epath.Path) -> epath.Path:
    return path / METADATA_ITEM / "metadata"


def read_metadata(directory: str | os.PathLike, *, step: int | None = None) -> dict[str, Any]:
    """The JSON metadata of a checkpoint (spec and per-path entries), arrays unread.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, jlora
      >>> from jlora import checkpoint
      >>> spec = jlora.LoraSpec(rank=1, targets="w")
      >>> adapters = jlora.init(spec, {"w": jnp.ones((4, 4))}, jax.random.key(0))
      >>> path = checkpoint.save(tempfile.mkdtemp() + "/ckpt", adapters, spec)
      >>> [e["path"] for e in checkpoint.read_metadata(path)["entries"]]
      ['w']
    """
    path = resolve(directory, step=step)
    return _read_metadata(path)


def _step_of(path: epath.Path) -> int | None:
    return int(path.name) if path.name.isdigit() else None


def _read_metadata(path: epath.Path) -> dict[str, Any]:
    """The checked metadata of the checkpoint at ``path`` (every value validated)."""
    file = str(_metadata_file(path))

    def damaged(message: str, **kwargs: Any) -> DamagedCheckpointError:
        return DamagedCheckpointError(file, message, step=_step_of(path), **kwargs)

    try:
        if not _metadata_file(path).exists():
            raise damaged("its metadata file is missing")
        raw = _io.read_small_file(file, what="checkpoint metadata")
        metadata = json.loads(raw.decode("utf-8"))
    except FileFormatError as error:
        raise damaged(str(error).removeprefix(f"{file}: ")) from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise damaged(f"its metadata is not valid UTF-8 JSON ({error})") from None
    except OSError as error:
        raise damaged(f"its metadata cannot be read ({error.strerror})") from None
    if not isinstance(metadata, dict):
        raise damaged("bad metadata", key="(top level)", expected="a JSON object",
                      found=type(metadata).__name__)
    if metadata.get("format") != FORMAT:
        raise FileFormatError(
            file, f"{str(path)!r} is not a jlora checkpoint", key="format",
            expected=repr(FORMAT), found=metadata.get("format"),
        )
    version = metadata.get("version")
    if not is_int(version) or version < 1:
        raise damaged("bad metadata", key="version", expected="a positive integer",
                      found=version)
    if version > VERSION:
        raise FileFormatError(
            file,
            f"written by a newer jlora (checkpoint version {version}; this jlora reads up "
            f"to {VERSION}): upgrade jlora",
        )
    entries = metadata.get("entries")
    if not isinstance(entries, list) or not entries:
        raise damaged("bad metadata", key="entries", expected="a non-empty list",
                      found=entries)
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        _check_entry(entry, f"entries[{index}]", seen, damaged)
    if not isinstance(metadata.get("spec"), dict):
        raise damaged("bad metadata", key="spec", expected="a JSON object",
                      found=metadata.get("spec"))
    return metadata


def _floating_dtype(value: Any) -> bool:
    try:
        return isinstance(value, str) and jnp.issubdtype(jnp.dtype(value), jnp.floating)
    except TypeError:
        return False


def _check_entry(entry: Any, key: str, seen: set[str], damaged) -> None:
    """One metadata entry: every field of the right type and range, shapes consistent."""
    if not isinstance(entry, dict):
        raise damaged("bad metadata", key=key, expected="a JSON object", found=entry)
    path = entry.get("path")
    if not isinstance(path, str) or not path or path in seen or "." in path:
        raise damaged("bad metadata", key=f"{key}.path",
                      expected="a unique non-empty leaf path", found=path)
    seen.add(path)
    kind = entry.get("kind")
    if kind == "trainable":
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(
            is_int(n) and n >= 0 for n in shape
        ):
            raise damaged("bad metadata", key=f"{key}.shape",
                          expected="a list of non-negative integers", found=shape, entry=path)
        if not _floating_dtype(entry.get("dtype")):
            raise damaged("bad metadata", key=f"{key}.dtype",
                          expected="a floating dtype name", found=entry.get("dtype"), entry=path)
        return
    if kind not in KINDS:
        raise damaged("bad metadata", key=f"{key}.kind",
                      expected=f"one of {[*sorted(KINDS), 'trainable']}", found=kind, entry=path)
    rank = entry.get("rank")
    if not is_int(rank) or rank < 1:
        raise damaged("bad metadata", key=f"{key}.rank", expected="a positive integer",
                      found=rank, entry=path)
    for field, low, high in (("scale", -math.inf, math.inf), ("dropout", 0.0, 1.0)):
        value = entry.get(field)
        if not is_real(value) or not math.isfinite(value) or not low <= value < high:
            expected = "a finite number" if field == "scale" else "a number in [0, 1)"
            raise damaged("bad metadata", key=f"{key}.{field}", expected=expected,
                          found=value, entry=path)
    try:
        layout = Layout.from_dict(entry.get("layout"))
    except (TypeError, ValueError, AttributeError) as error:
        raise damaged(f"bad layout ({error})", key=f"{key}.layout", entry=path) from None
    if any(n < 0 for n in layout.weight_shape):
        raise damaged("bad metadata", key=f"{key}.layout", expected="non-negative sizes",
                      found=list(layout.weight_shape), entry=path)
    dtypes = entry.get("dtype")
    names = set(KINDS[kind].SIGNATURES)
    if not isinstance(dtypes, dict) or set(dtypes) != names or not all(
        _floating_dtype(v) for v in dtypes.values()
    ):
        raise damaged("bad metadata", key=f"{key}.dtype",
                      expected=f"floating dtype names for {sorted(names)}", found=dtypes,
                      entry=path)
    problem = KINDS[kind].meta_problem(entry, rank)  # e.g. a stack's per-slot ranks
    if problem is not None:
        name, expected = problem
        raise damaged("bad metadata", key=f"{key}.{name}", expected=expected,
                      found=entry.get(name), entry=path)
    checksums = entry.get("crc32")
    if checksums is not None and (
        not isinstance(checksums, dict)
        or not all(is_int(v) for v in checksums.values())
    ):
        raise damaged("bad metadata", key=f"{key}.crc32", expected="integers per field",
                      found=checksums, entry=path)


# -- loading --------------------------------------------------------------------------


def load(
    directory: str | os.PathLike,
    *,
    step: int | None = None,
    like: Adapters | None = None,
) -> tuple[Adapters, LoraSpec]:
    """Read adapters and their spec from a checkpoint written by :func:`save`.

    Without ``like`` the adapters come back as a nested dict keyed by the components
    of their paths, arrays on the default device: this is the adapters tree of any
    dict-based params (Flax Linen, Hugging Face Flax). With ``like`` (an adapters tree
    for the same model, e.g. ``jax.eval_shape(lambda: jlora.init(...))`` or a real
    one, possibly sharded) they are restored onto its structure (needed for NNX and
    Equinox params), its shardings (so a checkpoint can be resharded onto another
    mesh) and its dtypes. Scale, layout and dropout always come from the checkpoint.
    Values are bit-exact when the dtypes are the saved ones.

    Args:
      directory: a checkpoint, or a directory of steps (see :func:`resolve`).
      step: which step; default the newest complete one.
      like: an adapters tree whose structure, shardings and dtypes to restore onto.

    Returns:
      ``(adapters, spec)``. When the saved spec had a callable ``targets`` (or
      ``trainable``), the returned spec targets the saved paths instead.

    Raises:
      jlora.MissingFileError: no complete checkpoint (see :func:`resolve`).
      jlora.DamagedCheckpointError: the step is damaged (a missing or corrupt array
        file, edited metadata); it names the step and, where it can, the entry.
        Without ``step``, a damaged newest step is skipped with a warning and the
        newest undamaged one is loaded; this error comes only when all are damaged.
      ValueError: ``like`` has other paths, shapes or layouts than the checkpoint
        (the message names the first mismatch).

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, jlora
      >>> from jlora import checkpoint
      >>> params = {"dense": {"kernel": jnp.ones((6, 4))}}
      >>> spec = jlora.LoraSpec(rank=2, targets=["dense"])
      >>> adapters = jlora.init(spec, params, jax.random.key(0))
      >>> path = checkpoint.save(tempfile.mkdtemp() + "/ckpt", adapters, spec)
      >>> loaded, loaded_spec = checkpoint.load(path)
      >>> bool((loaded["dense"]["kernel"].lora_a == adapters["dense"]["kernel"].lora_a).all())
      True
    """
    path = resolve(directory, step=step)
    root = _as_path(directory)
    if step is not None or path == root or _is_checkpoint(root):
        return _load_one(path, like)
    # Newest complete step first; a damaged one is skipped, with a warning.
    damage: list[DamagedCheckpointError] = []
    for candidate in sorted(_step_paths(path.parent), reverse=True):
        try:
            loaded = _load_one(path.parent / str(candidate), like)
        except DamagedCheckpointError as error:
            damage.append(error)
            continue
        if damage:
            warnings.warn(
                f"jlora.load: loaded step {candidate} of {str(path.parent)!r} because newer "
                f"steps are damaged: {'; '.join(str(e) for e in damage)}",
                stacklevel=2,
            )
        return loaded
    raise damage[0]


def _load_one(path: epath.Path, like: Adapters | None) -> tuple[Adapters, LoraSpec]:
    metadata = _read_metadata(path)
    file = str(_metadata_file(path))
    entries = {entry["path"]: entry for entry in metadata["entries"]}
    spec = _spec_from(metadata, file)
    if like is None:
        targets = {p: _default_target(entry) for p, entry in entries.items()}
    else:
        targets = _targets_like(like, entries, path)
    restore_args = _nest({p: _restore_args(t) for p, t in targets.items()})
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            restored = checkpointer.restore(
                path,
                args=ocp.args.Composite(
                    **{ARRAYS_ITEM: ocp.args.PyTreeRestore(restore_args=restore_args)}
                ),
            )[ARRAYS_ITEM]
        arrays = {p: _leaf(restored, p) for p in entries}
    except Exception as error:  # Orbax and tensorstore raise many types for bad files
        text = " ".join(str(error).split())[:300]
        named = [p for p in entries if p in text or p.replace("/", ".") in text]
        raise DamagedCheckpointError(
            str(path / ARRAYS_ITEM),
            f"its arrays cannot be read ({type(error).__name__}: {text})",
            step=_step_of(path),
            entry=named[0] if len(named) == 1 else None,
        ) from None
    for leaf_path, entry in entries.items():
        _check_arrays(path, leaf_path, entry, arrays[leaf_path], targets[leaf_path])
    nodes = {p: _node(entry, arrays[p]) for p, entry in entries.items()}
    if like is None:
        return _nest(nodes), spec

    def place(key_path, node):
        return nodes[path_str(key_path)] if node is not None else None

    return jax.tree_util.tree_map_with_path(place, like, is_leaf=is_adapter), spec


def _check_arrays(path: epath.Path, leaf_path: Path, entry, arrays: Any, target: Any) -> None:
    """The restored arrays have the metadata's shapes, and their saved checksums."""
    named = arrays if isinstance(arrays, dict) else {"value": arrays}
    wanted = target if isinstance(target, dict) else {"value": target}
    for name, array in named.items():
        if name not in wanted or shape_of(array) != shape_of(wanted[name]):
            raise DamagedCheckpointError(
                str(path / ARRAYS_ITEM),
                f"field {name!r} has shape {list(shape_of(array))} but the metadata "
                f"gives {list(shape_of(wanted.get(name)))}",
                step=_step_of(path),
                entry=leaf_path,
            )
    checksums = entry.get("crc32")
    if not checksums:
        return
    for name, array in named.items():
        if isinstance(array, jax.Array) and not array.is_fully_addressable:
            return
        saved_dtype = entry["dtype"][name] if isinstance(entry["dtype"], dict) else entry["dtype"]
        if name not in checksums or str(jnp.dtype(array.dtype)) != saved_dtype:
            continue  # restored in another dtype (like=...): the bytes differ by design
        if _crc32(array) != checksums[name]:
            raise DamagedCheckpointError(
                str(path / ARRAYS_ITEM),
                f"field {name!r} does not match the checksum saved with it (the array "
                "file is corrupt)",
                step=_step_of(path),
                entry=leaf_path,
            )


def _spec_from(metadata: Mapping[str, Any], file: str | None = None) -> LoraSpec:
    data = dict(metadata["spec"])
    entries = metadata["entries"]
    lora_paths = [e["path"] for e in entries if e["kind"] in KINDS]
    copies = [e["path"] for e in entries if e["kind"] == "trainable"]
    # A selector RE2 cannot match in linear time (a look-around the user wrote) is
    # not run from a file: the saved paths stand in for it, as for a callable.
    replaced = [
        name
        for name in ("targets", "exclude", "trainable")
        if isinstance(data.get(name), str) and not linear_time(data[name])
    ]
    for name in replaced:
        data[name] = {"callable": data[name]}
    if replaced:
        warnings.warn(
            f"the checkpoint's spec has {replaced} regexes that RE2 cannot match in linear "
            "time; the loaded spec selects the saved paths instead",
            stacklevel=3,
        )
    if isinstance(data.get("exclude"), dict):
        data["exclude"] = None
    targets = _paths_regex(lora_paths) if isinstance(data.get("targets"), dict) else None
    spec = LoraSpec.from_dict(data, targets=targets, source=file)
    if isinstance(data.get("trainable"), dict):
        spec = dataclasses.replace(spec, trainable=_paths_regex(copies) if copies else None)
    return spec


def _paths_regex(paths: list[Path]) -> str:
    return "|".join(re.escape(p) for p in paths) if paths else r"[^\s\S]"


def _default_target(entry: Mapping[str, Any]) -> Any:
    """Abstract arrays for a restore without ``like``: numpy, the saved dtypes."""
    if entry["kind"] == "trainable":
        return jax.ShapeDtypeStruct(tuple(entry["shape"]), jnp.dtype(entry["dtype"]))
    layout = Layout.from_dict(entry["layout"])
    rank = int(entry["rank"])
    kind = KINDS[entry["kind"]]
    extra = kind.extra_sizes_from(entry)
    return {
        name: jax.ShapeDtypeStruct(
            kind.field_shape(name, layout, rank, **extra), jnp.dtype(entry["dtype"][name])
        )
        for name in kind.SIGNATURES
    }


def _targets_like(like: Adapters, entries: Mapping[Path, Any], path: epath.Path) -> dict:
    items = adapter_items(like)
    like_paths = [p for p, _ in items]
    missing = [p for p in entries if p not in set(like_paths)]
    extra = [p for p in like_paths if p not in entries]
    if missing or extra:
        raise ValueError(
            f"load(like=...): the checkpoint {str(path)!r} and `like` hold different "
            f"adapters; only in the checkpoint: {missing[:5]}, only in like: {extra[:5]}"
        )
    targets = {}
    for leaf_path, node in items:
        entry = entries[leaf_path]
        saved = _default_target(entry)
        if entry["kind"] in KINDS:
            if not isinstance(node, LoraAdapter) or node.KIND != entry["kind"]:
                found = (
                    f"a {node.KIND} adapter"
                    if isinstance(node, LoraAdapter)
                    else (f"a {describe(node)} leaf")
                )
                raise ValueError(
                    f"load(like=...): the checkpoint has a {entry['kind']} adapter at "
                    f"{leaf_path!r} but like has {found} there"
                )
            layout = Layout.from_dict(entry["layout"])
            if node.layout != layout:
                raise ValueError(
                    f"load(like=...): the adapter at {leaf_path!r} was saved for a weight "
                    f"of shape {list(layout.weight_shape)} with layout {layout}, but like "
                    f"has {node.layout}"
                )
            like_arrays = node.arrays()
        else:
            like_arrays = node
        saved_leaves = jax.tree_util.tree_leaves(saved)
        like_leaves = jax.tree_util.tree_leaves(like_arrays)
        if len(saved_leaves) != len(like_leaves):
            raise ValueError(
                f"load(like=...): the checkpoint has a {entry['kind']} leaf at "
                f"{leaf_path!r} but like has {describe(node)} there"
            )
        for saved_leaf, like_leaf in zip(saved_leaves, like_leaves):
            if shape_of(saved_leaf) != shape_of(like_leaf):
                raise ValueError(
                    f"load(like=...): at {leaf_path!r} the checkpoint has "
                    f"{describe(saved_leaf)} but like has {describe(like_leaf)}"
                )
        targets[leaf_path] = like_arrays
    return targets


def _restore_args(target: Any) -> Any:
    def one(leaf):
        sharding = getattr(leaf, "sharding", None)
        if sharding is None:  # no placement asked for: numpy, put on a device below
            return ocp.RestoreArgs(restore_type=np.ndarray, dtype=jnp.dtype(leaf.dtype))
        return ocp.ArrayRestoreArgs(
            sharding=sharding, global_shape=shape_of(leaf), dtype=jnp.dtype(leaf.dtype)
        )

    return jax.tree_util.tree_map(one, target)


def _meta_json(value: Any) -> Any:
    """A kind's static field as JSON: a string, an integer, or a tuple of integers as a
    list."""
    if isinstance(value, str):
        return value
    return [int(v) for v in value] if isinstance(value, tuple) else int(value)


def _meta_value(value: Any) -> Any:
    """:func:`_meta_json` undone (the entry was checked by the kind's ``meta_problem``)."""
    if isinstance(value, str):
        return value
    return tuple(int(v) for v in value) if isinstance(value, list) else int(value)


def _node(entry: Mapping[str, Any], arrays: Any) -> Any:
    arrays = jax.tree_util.tree_map(
        lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x, arrays
    )
    if entry["kind"] == "trainable":
        return arrays
    kind = KINDS[entry["kind"]]
    return kind(
        **arrays,
        scale=float(entry["scale"]),
        layout=Layout.from_dict(entry["layout"]),
        dropout=float(entry["dropout"]),
        **{name: _meta_value(entry[name]) for name in kind.EXTRA_META},
    )
