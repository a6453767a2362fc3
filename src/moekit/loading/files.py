"""The files of a local Hugging Face checkpoint, read without transformers: ``config.json`` (and the dtype it
declares), the ``.safetensors`` headers and the shard index. Errors name the file (``ValueError``; a path that is no
checkpoint: :class:`CheckpointNotFoundError`)."""

from __future__ import annotations

import json
import os
import struct

import torch

from .._checks import DTYPE_NAMES


class CheckpointNotFoundError(FileNotFoundError, ValueError):
    """A path that is no checkpoint directory: a ``ValueError`` (bad input, as every argument error of
    moekit) that is also the ``FileNotFoundError`` earlier releases raised."""


def read_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):  # (round 62: an unreadable folder or a config.json folder read "does not exist")
        why = ("is not a file" if os.path.exists(cfg_path) else "cannot be read (the folder's permissions)"
               if os.path.isdir(path) and not os.access(path, os.R_OK | os.X_OK) else "does not exist")
        raise CheckpointNotFoundError(f"{path!r} is not a checkpoint directory: {cfg_path} {why}")
    try:
        with open(cfg_path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{cfg_path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_path} must hold a JSON object, got {type(config).__name__}")
    return config


def config_dtype(config: dict, source: str, text: dict | None = None) -> torch.dtype:
    """The float dtype config.json declares (``dtype``, else ``torch_dtype``; then the same of ``text``, a wrapper's
    text tower, where only that declares it (round 65: such a config loaded float32); float32 when none is set).
    A name moekit does not run (e.g. ``"int8"``) raises ``ValueError`` naming the file: pass ``dtype=``."""
    text = text if isinstance(text, dict) else {}
    name = (config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
            or "float32")
    dtype = DTYPE_NAMES.get(str(name).lower().removeprefix("torch."))
    if dtype is None:
        raise ValueError(f"{source}: dtype {name!r} is not a float dtype moekit runs "
                         f"({sorted(DTYPE_NAMES)}); pass dtype= to load_moe_layers")
    return dtype


def read_header(file: str) -> dict[str, tuple[str, int, int]]:
    """key -> (dtype, start, end byte offsets) of one ``.safetensors`` file, from its header alone.

    A truncated or corrupt file raises ``ValueError`` naming it."""
    size = os.path.getsize(file)
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        out = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            start, end = info["data_offsets"]
            if not 0 <= start <= end <= size - 8 - n:
                raise ValueError(f"tensor {key!r} ends at byte {end} of a {size - 8 - n}-byte data section")
            if not isinstance(info["dtype"], str):  # (round 65: an AttributeError later, blamed on config.json)
                raise ValueError(f"tensor {key!r} has dtype {info['dtype']!r}, expected a name such as 'BF16'")
            out[key] = (info["dtype"], start, end)
        return out
    except (ValueError, KeyError, TypeError, struct.error) as err:
        raise ValueError(f"{file} is not a readable .safetensors file (truncated or corrupt?): {err}") from None


def checkpoint_files(path: str) -> dict[str, str]:
    """key -> safetensors file, from ``model.safetensors.index.json`` or by listing every shard."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index} is not a valid safetensors index (a JSON object with 'weight_map'): {err}") from None
        bad = (f"'weight_map' is a {type(weight_map).__name__}" if not isinstance(weight_map, dict) else next(
            (f"weight_map[{k!r}] is {v!r}" for k, v in weight_map.items() if not isinstance(v, str)), None))
        if bad:  # (round 65: an AttributeError / TypeError, which inspect blamed on config.json)
            raise ValueError(f"{index} is not a valid safetensors index: {bad}; expected an object of key -> shard "
                             "file name")
        return {k: os.path.join(path, v) for k, v in weight_map.items()}
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointNotFoundError(f"no *.safetensors file in {path!r}")
    out: dict[str, str] = {}
    for name in files:  # (round 65: a key in two files took the alphabetically last one's copy, silently)
        f = os.path.join(path, name)
        for k in read_header(f):
            if out.setdefault(k, f) != f:
                raise ValueError(f"{path}: checkpoint key {k!r} is in both {os.path.basename(out[k])} and {name}, "
                                 "and no model.safetensors.index.json says which to read: remove the stale file or "
                                 "add the index (without an index every *.safetensors file of the folder is read)")
    return out
