"""The ``jlora`` command: inspect, merge and convert adapter files.

``jlora inspect DIR`` describes an adapter (a jlora Orbax checkpoint or a Hugging Face
PEFT directory); ``jlora merge`` folds one into a base checkpoint (Orbax or
safetensors) for export; ``jlora convert`` turns one format into the other. Every
command has ``--help``; bad input exits non-zero with a one-line error.

Also runnable as ``python -m jlora.cli``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["main"]

_KEY_MAP_HELP = (
    "how Flax param paths map to PyTorch module names: a built-in name (gpt2, llama, "
    "bert, flax) or package.module:attribute naming your own key map (this imports "
    "and runs that module's code)"
)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``jlora merge: error: ...``) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="jlora",
        description="Inspect, merge and convert LoRA adapter files (jlora Orbax checkpoints "
        "and Hugging Face PEFT directories).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    inspect = commands.add_parser(
        "inspect",
        help="describe an adapter: format, targets, ranks, scales, sizes, update norms",
        description="Describe an adapter directory: its format (Orbax or PEFT), targets, "
        "ranks, alpha, scale, trainable parameter count, bytes, and per target the "
        "Frobenius norm of the update scale·A·B.",
    )
    inspect.add_argument("adapter", metavar="DIR", help="a jlora checkpoint or PEFT directory")
    inspect.add_argument(
        "--step", type=int, help="step of a checkpoint directory (default: newest)"
    )
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead")

    merge = commands.add_parser(
        "merge",
        help="merge an adapter into base weights and write the merged weights",
        description="Merge an adapter into a base checkpoint and write the merged weights "
        "in the base's format. BASE is an Orbax PyTree checkpoint directory or a "
        ".safetensors file. A jlora adapter merges into bases whose leaf paths it was made "
        "for (safetensors keys are those paths, '/'- or '.'-joined). A PEFT adapter merges "
        "into a PyTorch-named safetensors file directly (keys '<module>.weight'), or, with "
        "--key-map, into Flax weights.",
    )
    merge.add_argument(
        "--base", required=True, help="base weights: Orbax directory or .safetensors"
    )
    merge.add_argument("--adapter", required=True, metavar="DIR", help="the adapter to merge")
    merge.add_argument("--out", required=True, help="where to write the merged weights")
    merge.add_argument("--key-map", help=_KEY_MAP_HELP + " (for a PEFT adapter on Flax weights)")
    merge.add_argument("--step", type=int, help="step of the adapter checkpoint (default: newest)")
    merge.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    convert = commands.add_parser(
        "convert",
        help="convert an adapter between jlora Orbax and Hugging Face PEFT",
        description="Convert an adapter: a jlora checkpoint to a PEFT directory (--to peft), "
        "or a PEFT directory to a jlora checkpoint (--to orbax, which needs --base, the "
        "Flax weights the adapter is for; only their shapes are read).",
    )
    convert.add_argument("adapter", metavar="DIR", help="the adapter to convert")
    convert.add_argument("--to", required=True, choices=("peft", "orbax"), help="output format")
    convert.add_argument("--key-map", required=True, help=_KEY_MAP_HELP)
    convert.add_argument("--out", required=True, help="output directory")
    convert.add_argument(
        "--base", help="with --to orbax: the Flax base weights (Orbax or safetensors)"
    )
    convert.add_argument("--step", type=int, help="step of the checkpoint (default: newest)")
    convert.add_argument("--target", choices=("vllm",), help="with --to peft: check vLLM's limits")
    convert.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``jlora`` command line; returns the exit status.

    Args:
      argv: the arguments after the program name (default ``sys.argv[1:]``).

    Returns:
      0 on success, 1 when the input is bad (a one-line error on stderr), 2 on a
      usage error.

    Example:
      >>> main(["inspect", "/nonexistent"])
      1
    """
    parser = _parser()
    try:
        options = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error already printed
        return int(exit_.code or 0)
    _quiet_logs()
    commands = {"inspect": _inspect, "merge": _merge, "convert": _convert}
    try:
        commands[options.command](options)
    except (ValueError, TypeError, KeyError, OSError, ImportError, AttributeError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"jlora {options.command}: error: {message}", file=sys.stderr)
        return 1
    return 0


def _quiet_logs() -> None:
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:  # pragma: no cover - absl comes with orbax
        pass


# -- reading adapters -----------------------------------------------------------------


def _is_peft(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, "adapter_config.json"))


def _dir_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(path)
        for name in names
    )


def _update_norm(lora_a: Any, lora_b: Any, scale: float) -> float:
    """``|scale · A @ B|_F`` summed over stack axes, from r×r Gram matrices (no ΔW)."""
    import numpy as np

    a = np.asarray(lora_a, dtype=np.float64)
    b = np.asarray(lora_b, dtype=np.float64)
    gram_a = np.swapaxes(a, -1, -2) @ a  # (..., r, r)
    gram_b = b @ np.swapaxes(b, -1, -2)  # (..., r, r)
    squared = float(np.sum(gram_a * np.swapaxes(gram_b, -1, -2)))
    return abs(scale) * math.sqrt(max(squared, 0.0))


def _describe_orbax(directory: str, step: int | None) -> dict[str, Any]:
    import jax.numpy as jnp

    from jlora import checkpoint

    path = checkpoint.resolve(directory, step=step)
    adapters, spec = checkpoint.load(path)
    metadata = checkpoint.read_metadata(path)
    nodes = {p: n for p, n in _adapter_items(adapters)}
    targets = []
    for entry in metadata["entries"]:
        node = nodes[entry["path"]]
        if entry["kind"] != "trainable":
            rank, scale = int(entry["rank"]), float(entry["scale"])
            from jlora._adapter import scale_denominator

            denominator = scale_denominator(rank, spec.rslora)
            arrays = list(node.arrays().values())
            targets.append(
                {
                    "path": entry["path"],
                    "kind": entry["kind"],
                    "shape": list(node.layout.weight_shape),
                    "rank": rank,
                    "alpha": scale * denominator,
                    "scale": scale,
                    "dtype": str(jnp.dtype(arrays[0].dtype)),
                    "parameters": sum(int(x.size) for x in arrays),
                    # A trainable-tokens adapter has no factors: its update needs the base.
                    "update_norm": None if node.lora_a is None else _update_norm(
                        node.lora_a, node.lora_b, scale),
                }
            )
        else:
            targets.append(
                {
                    "path": entry["path"],
                    "kind": "trainable",
                    "shape": list(node.shape),
                    "dtype": str(jnp.dtype(node.dtype)),
                    "parameters": int(node.size),
                }
            )
    return {
        "format": "orbax",
        "path": str(path),
        "spec": metadata["spec"],
        "targets": targets,
        "parameters": sum(t["parameters"] for t in targets),
        "bytes": int(metadata["bytes"]),
        "bytes_on_disk": _dir_bytes(str(path)),
    }


def _describe_peft(directory: str) -> dict[str, Any]:
    from jlora import peft

    config, modules = peft.read(directory)
    targets = []
    for module, factors in sorted(modules.items()):
        lora_a, lora_b = factors["A"], factors["B"]  # (r, in) and (out, r)
        alpha, scale = factors["alpha"], factors["scale"]
        targets.append(
            {
                "path": module,
                "kind": "dora" if factors["magnitude"] is not None else "lora",
                "shape": [int(lora_b.shape[0]), int(lora_a.shape[1])],
                "rank": int(lora_a.shape[0]),
                "alpha": alpha,
                "scale": scale,
                "dtype": str(lora_a.dtype),
                "parameters": int(lora_a.size + lora_b.size),
                "update_norm": _update_norm(lora_a.T, lora_b.T, scale),
            }
        )
    files = ("adapter_model.safetensors", "adapter_config.json")
    return {
        "format": "peft",
        "path": directory,
        "spec": {
            key: config.get(key)
            for key in ("r", "lora_alpha", "use_rslora", "lora_dropout", "target_modules")
        },
        "targets": targets,
        "parameters": sum(t["parameters"] for t in targets),
        "bytes": sum(int(f["A"].nbytes + f["B"].nbytes) for f in modules.values()),
        "bytes_on_disk": sum(_dir_bytes(os.path.join(directory, name)) for name in files),
    }


def _adapter_items(adapters: Any) -> list[tuple[str, Any]]:
    from jlora._tree import adapter_items

    return adapter_items(adapters)


def _inspect(options: argparse.Namespace) -> None:
    if _is_peft(options.adapter):
        if options.step is not None:
            raise ValueError(f"{options.adapter} is a PEFT directory: it has no steps")
        report = _describe_peft(options.adapter)
    else:
        report = _describe_orbax(options.adapter, options.step)
    if options.json:
        print(json.dumps(report, indent=2))
        return
    print(_format_report(report))


def _format_report(report: dict[str, Any]) -> str:
    spec = report["spec"]
    if report["format"] == "orbax":
        summary = (
            f"rank {spec['rank']}, alpha {spec['alpha']:g}, rslora {spec['rslora']}, "
            f"dropout {spec['dropout']:g}, targets {spec['targets']!r}"
        )
    else:
        summary = (
            f"r {spec['r']}, lora_alpha {spec['lora_alpha']:g}, use_rslora "
            f"{bool(spec['use_rslora'])}, lora_dropout {spec['lora_dropout'] or 0:g}"
        )
    lines = [
        f"format:     {report['format']} ({report['path']})",
        f"spec:       {summary}",
        f"targets:    {len(report['targets'])}",
        f"parameters: {report['parameters']:,} trainable",
        f"bytes:      {report['bytes']:,} in arrays, {report['bytes_on_disk']:,} on disk",
        "",
    ]
    rows = [("path", "kind", "shape", "rank", "alpha", "scale", "dtype", "|scale·A·B|_F")]
    for target in report["targets"]:
        lora = target["kind"] != "trainable"
        rows.append(
            (
                target["path"],
                target["kind"],
                "x".join(str(d) for d in target["shape"]),
                str(target["rank"]) if lora else "-",
                f"{target['alpha']:g}" if lora else "-",
                f"{target['scale']:g}" if lora else "-",
                target["dtype"],
                f"{target['update_norm']:.6g}" if target.get("update_norm") is not None else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return "\n".join(lines)


# -- base weights ---------------------------------------------------------------------


def _is_safetensors(path: str) -> bool:
    if not os.path.isfile(path):
        return path.endswith(".safetensors")
    return path.endswith(".safetensors") or _safetensors_header_ok(path)


def _safetensors_header_ok(path: str) -> bool:
    try:
        from safetensors import safe_open

        with safe_open(path, framework="numpy"):
            return True
    except Exception:
        return False


def _orbax_pytree_dir(path: str) -> str:
    """The PyTree item directory of an Orbax checkpoint (itself or its only item)."""
    if os.path.isfile(os.path.join(path, "_METADATA")):
        return path
    if os.path.isdir(path):
        items = [
            os.path.join(path, name)
            for name in sorted(os.listdir(path))
            if os.path.isfile(os.path.join(path, name, "_METADATA"))
        ]
        if len(items) == 1:
            return items[0]
        if items:
            names = [os.path.basename(i) for i in items]
            raise ValueError(
                f"{path} holds several Orbax items {names}: pass the one with the weights"
            )
    raise ValueError(
        f"{path} is neither a .safetensors file nor an Orbax PyTree checkpoint (no "
        "_METADATA file in it or in one item directory)"
    )


def _orbax_metadata(path: str) -> Any:
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(path)
    return getattr(metadata.item_metadata, "tree", metadata.item_metadata)


def _is_array_metadata(leaf: Any) -> bool:
    import orbax.checkpoint as ocp

    return isinstance(leaf, ocp.metadata.ArrayMetadata)


def _read_orbax(path: str, *, abstract: bool) -> Any:
    """An Orbax PyTree checkpoint as numpy arrays (or ``ShapeDtypeStruct`` s)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    item = os.path.abspath(_orbax_pytree_dir(path))
    tree = _orbax_metadata(item)
    if abstract:
        return jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype) if hasattr(m, "shape") else m,
            tree,
        )
    restore_args = jax.tree_util.tree_map(
        lambda m: (
            ocp.RestoreArgs(restore_type=np.ndarray) if _is_array_metadata(m) else ocp.RestoreArgs()
        ),
        tree,
    )
    with ocp.PyTreeCheckpointer() as checkpointer:
        return checkpointer.restore(item, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def _separator(keys: Sequence[str]) -> str:
    return "/" if any("/" in key for key in keys) else "."


def _nest(flat: dict[str, Any], separator: str) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(separator)
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"safetensors key {key!r} nests under another tensor's key")
        node[leaf] = value
    return nested


def _flatten(nested: Any, separator: str) -> dict[str, Any]:
    from jlora._paths import leaves_with_paths

    return {path.replace("/", separator): leaf for path, leaf in leaves_with_paths(nested)}


def _safetensors_shapes(path: str) -> dict[str, Any]:
    import jax
    import numpy as np
    from safetensors import safe_open

    shapes = {}
    with safe_open(path, framework="numpy") as handle:
        for key in handle.keys():
            tensor = handle.get_slice(key)
            dtype = _safetensors_dtype(tensor.get_dtype())
            shapes[key] = jax.ShapeDtypeStruct(tuple(tensor.get_shape()), np.dtype(dtype))
    return shapes


def _safetensors_dtype(name: str) -> str:
    table = {
        "F64": "float64",
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "I64": "int64",
        "I32": "int32",
        "I16": "int16",
        "I8": "int8",
        "U8": "uint8",
        "BOOL": "bool",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
    }
    if name not in table:
        raise ValueError(f"unsupported safetensors dtype {name!r}")
    import ml_dtypes  # noqa: F401 - registers bfloat16 and float8 with numpy

    return table[name]


def _read_safetensors(path: str) -> tuple[dict[str, Any], dict[str, str] | None]:
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import load_file

    try:
        with safe_open(path, framework="numpy") as handle:
            metadata = handle.metadata()
        return load_file(path), metadata
    except (SafetensorError, ValueError, TypeError) as error:
        raise ValueError(
            f"{path} is not a readable safetensors file (malformed or truncated): {error}"
        ) from None


def _flax_base(path: str, *, abstract: bool) -> Any:
    """Base weights as a nested tree of Flax paths (Orbax, or a '/'- or '.'-keyed file)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"base weights {path} do not exist")
    if _is_safetensors(path):
        flat = _safetensors_shapes(path) if abstract else _read_safetensors(path)[0]
        return _nest(flat, _separator(list(flat)))
    return _read_orbax(path, abstract=abstract)


# -- merge ----------------------------------------------------------------------------


def _merge(options: argparse.Namespace) -> None:
    _check_out(
        options,
        _merged_safetensors if _is_safetensors(options.base) else _merged_orbax,
    )
    if not os.path.exists(options.base):
        raise FileNotFoundError(f"base weights {options.base} do not exist")
    peft_adapter = _is_peft(options.adapter)
    if peft_adapter and options.key_map is None:
        if not _is_safetensors(options.base):
            raise ValueError(
                f"merging the PEFT adapter {options.adapter} into the Orbax weights "
                f"{options.base} needs --key-map (Flax paths to PyTorch module names)"
            )
        tensors, metadata = _read_safetensors(options.base)
        merged = _merge_peft_torch(tensors, options.adapter, options.base)
        _write_safetensors(options.out, merged, metadata)
    else:
        merged_tree, write = _merge_flax(options, peft_adapter)
        write(merged_tree)
    print(f"wrote merged weights to {options.out}")


def _merge_flax(options, peft_adapter: bool) -> tuple[Any, Callable[[Any], None]]:
    import numpy as np

    import jlora
    from jlora import checkpoint, peft

    if _is_safetensors(options.base):
        flat, metadata = _read_safetensors(options.base)
        separator = _separator(list(flat))
        base = _nest(flat, separator)

        def write(tree):
            out = {k: np.asarray(v) for k, v in _flatten(tree, separator).items()}
            _write_safetensors(options.out, out, metadata)

    else:
        base = _read_orbax(options.base, abstract=False)

        def write(tree):
            _write_orbax(options.out, tree)

    if peft_adapter:
        adapters, _ = peft.load(options.adapter, base, key_map=_key_map(options.key_map))
    else:
        adapters, _ = checkpoint.load(options.adapter, step=options.step)
    return jlora.merge(base, adapters), write


def _merge_peft_torch(tensors: dict[str, Any], adapter: str, base_path: str) -> dict[str, Any]:
    """Merge a PEFT adapter into PyTorch-named weights with the library's own merge.

    The weights become a params tree keyed by module name, each PyTorch ``weight`` with
    its layout (Linear ``(out, in)``; Embedding and GPT-2 Conv1D ``(in, out)``), and the
    adapter is read by ``jlora.peft.load`` (every check it makes) and merged by
    ``jlora.merge`` (LoRA and DoRA alike).
    """
    import numpy as np

    import jlora
    from jlora import peft

    config, modules = peft.read(adapter)
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    for module in modules:
        if f"{module}.weight" not in tensors:
            key = f"{module}.weight"
            suffix = key.split(".", 1)[-1]
            near = [k for k in tensors if k.endswith(suffix)][:3]
            hint = f" (similar: {near})" if near else ""
            raise ValueError(
                f"the adapter {adapter} adapts {module!r} but {base_path} has no tensor "
                f"{key!r}{hint}: is it for another model?"
            )
    names = {module.replace(".", "/") + "/weight": module for module in modules}
    params = _nest(
        {k.replace(".", "/"): v for k, v in tensors.items() if k.replace(".", "/") in names}, "/"
    )
    key_map = _TorchNames(names, modules, fan_in_fan_out)
    adapters, _ = peft.load(adapter, params, key_map=key_map)
    merged = jlora.merge(params, adapters)
    out = dict(tensors)
    for path, value in _flatten(merged, "/").items():
        out[names[path] + ".weight"] = np.asarray(value)
    return out


class _TorchNames:
    """A ``jlora.peft`` key map for a params tree keyed by PyTorch module names."""

    def __init__(self, names, modules, fan_in_fan_out):
        self.names, self.modules, self.fan_in_fan_out = names, modules, fan_in_fan_out

    def __call__(self, path: str) -> str | None:
        return self.names.get(path)

    def layout(self, path: str, shape, stack: int):
        from jlora import Layout

        module = self.names.get(path)
        if module is None or len(shape) != 2 or stack:
            return None
        stored_in_out = self.fan_in_fan_out or self.modules[module]["embedding"]
        in_axes, out_axes = ((0,), (1,)) if stored_in_out else ((1,), (0,))
        return Layout(tuple(shape), (), in_axes, out_axes)


_MERGED_BY = "jlora merge"
_MERGE_MARK = "jlora_merge.json"


def _check_out(options: argparse.Namespace, replaceable: Callable[[str], bool] | None) -> None:
    """Refuse an output that is an input, a link, or an existing file jlora did not write
    (``replaceable``; None where the writer itself refuses what it did not write)."""
    from jlora import _io
    from jlora.errors import WriteRefusedError

    inputs = [p for p in (getattr(options, "base", None), options.adapter) if p]
    out = _io.check_target(options.out, inputs=inputs, what="--out")
    if not os.path.lexists(out):
        return
    if not options.overwrite:
        raise ValueError(f"{options.out} already exists; pass --overwrite to replace it")
    if replaceable is not None and not replaceable(out):
        raise WriteRefusedError(
            f"--out {options.out} exists and is not something this command writes; "
            "--overwrite replaces only jlora's own output (remove it yourself or choose "
            "another --out)"
        )


def _merged_safetensors(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    try:
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as handle:
            return (handle.metadata() or {}).get("jlora") == _MERGED_BY
    except Exception:  # not a safetensors file at all
        return False


def _merged_orbax(path: str) -> bool:
    return os.path.isfile(os.path.join(path, _MERGE_MARK))


def _write_safetensors(out: str, tensors: dict[str, Any], metadata: dict[str, str] | None) -> None:
    import numpy as np

    from jlora import _io

    arrays = {k: np.asarray(v) for k, v in tensors.items()}
    marked = {**(metadata or {}), "jlora": _MERGED_BY}
    _io.write_file(out, lambda handle: _io.write_safetensors(handle, arrays, marked))


def _write_orbax(out: str, tree: Any) -> None:
    import orbax.checkpoint as ocp

    from jlora import _io

    def build(fresh: str) -> None:
        with ocp.PyTreeCheckpointer() as checkpointer:
            checkpointer.save(fresh, args=ocp.args.PyTreeSave(tree))
        _io.write_json(os.path.join(fresh, _MERGE_MARK), {"written_by": _MERGED_BY})

    _io.replace_dir(out, build, replaceable=_merged_orbax, what="--out")


# -- convert --------------------------------------------------------------------------


_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _key_map(name: str) -> Any:
    """A built-in key map name, or ``package.module:attribute`` naming a callable.

    The second form imports ``package.module`` (running its code) and calls the
    attribute with names read from the files: use it only with your own code.
    """
    if ":" not in name:
        return name  # jlora.peft checks it and lists the built-in names
    module_name, attribute = name.split(":", 1)
    if not _DOTTED.fullmatch(module_name) or not _DOTTED.fullmatch(attribute):
        raise ValueError(
            f"--key-map {name!r}: expected package.module:attribute with dotted Python "
            "identifiers (it imports that module and runs its code)"
        )
    module = importlib.import_module(module_name)
    key_map: Any = module
    for part in attribute.split("."):
        key_map = getattr(key_map, part)
    if not callable(key_map):
        raise TypeError(f"--key-map {name} is a {type(key_map).__name__}, not a callable")
    return key_map


def _convert(options: argparse.Namespace) -> None:
    from jlora import checkpoint, peft

    source_is_peft = _is_peft(options.adapter)
    if options.to == "peft":
        _check_out(options, lambda out: os.path.isdir(out) and peft.is_adapter_dir(out))
        if source_is_peft:
            raise ValueError(f"{options.adapter} is already a PEFT adapter directory")
        if options.base is not None:
            raise ValueError("--base is only used with --to orbax")
        adapters, spec = checkpoint.load(options.adapter, step=options.step)
        peft.save(
            options.out, adapters, spec, key_map=_key_map(options.key_map), target=options.target
        )
    else:
        _check_out(options, None)  # checkpoint.save replaces only a jlora checkpoint
        if not source_is_peft:
            checkpoint.resolve(options.adapter)  # a clear error for a non-adapter directory
            raise ValueError(f"{options.adapter} is already a jlora Orbax checkpoint")
        if options.base is None:
            raise ValueError(
                "--to orbax needs --base, the Flax weights the adapter is for (Orbax or "
                "safetensors with Flax paths as keys): jlora names adapters by their paths"
            )
        if options.target is not None:
            raise ValueError("--target is only used with --to peft")
        shapes = _flax_base(options.base, abstract=True)
        adapters, spec = peft.load(options.adapter, shapes, key_map=_key_map(options.key_map))
        checkpoint.save(options.out, adapters, spec, overwrite=options.overwrite)
    print(f"wrote {options.to} adapter to {options.out}")


if __name__ == "__main__":
    sys.exit(main())
