"""The files of a local Hugging Face checkpoint, read without transformers: ``config.json`` (and the dtype it
declares), the ``.safetensors`` headers and the shard index. Errors name the file (``ValueError``; a path that is no
checkpoint: :class:`CheckpointNotFoundError`)."""

from __future__ import annotations

import json
import math
import os
import re
import struct

import torch

from .._checks import DTYPE_NAMES


class CheckpointNotFoundError(FileNotFoundError, ValueError):
    """A path that is no checkpoint directory: a ``ValueError`` (bad input, as every argument error of
    moekit) that is also the ``FileNotFoundError`` earlier releases raised."""


def read_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):  # (round 62: an unreadable folder or a config.json folder read "does not exist")
        locked = os.path.isdir(path) and not os.access(path, os.R_OK | os.X_OK)
        why = "cannot be read (the folder's permissions)" if locked else missing_why(cfg_path)
        raise CheckpointNotFoundError(f"{path!r} is not a checkpoint directory: {cfg_path} {why}{path_hint(path)}")
    try:
        with open(cfg_path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{cfg_path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_path} must hold a JSON object, got {type(config).__name__}")
    return config


#: a Hugging Face Hub repo id (``org/name``), which ``from_pretrained`` takes and a local path rarely looks like
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+")


def path_hint(path: str) -> str:
    """A clause for a ``path`` that is no checkpoint folder but what ``from_pretrained`` would take (round 68): a Hub
    repo id, the hub cache's ``models--org--name`` folder (its ``snapshots/<rev>`` folder is named, not loaded: the
    path given is the folder read, and the cache may hold several revisions), a ``~`` path (not expanded, as
    ``open()`` and ``from_pretrained`` do not: one folder read for one string); else ``""``."""
    if os.path.isdir(os.path.join(path, "snapshots")) and (os.path.basename(os.path.normpath(path)).startswith(
            "models--") or os.path.isdir(os.path.join(path, "refs"))):
        return "; " + _snapshot_hint(path)
    if os.path.exists(path):
        return ""
    if path.startswith("~"):
        return (f"; moekit does not expand '~' (nor does open()): pass os.path.expanduser({path!r}) = "
                f"{os.path.expanduser(path)!r}")
    if _REPO_ID.fullmatch(path):
        return (f"; {path!r} looks like a Hugging Face Hub repo id, and moekit reads local folders only: pass the "
                f"folder huggingface_hub.snapshot_download({path!r}) returns (it downloads the checkpoint or finds "
                "it in the hub cache)")
    return ""


def _snapshot_hint(root: str) -> str:
    """The ``snapshots/<rev>`` folder of a hub cache folder to pass (``refs/main``'s revision, else the one there)."""
    snaps = os.path.join(root, "snapshots")
    try:
        revs = sorted(r for r in os.listdir(snaps) if os.path.isdir(os.path.join(snaps, r)))
    except OSError:
        revs = []
    try:
        with open(os.path.join(root, "refs", "main")) as f:
            main = f.read().strip()
    except OSError:
        main = None
    head = f"{root!r} is a Hugging Face hub cache folder, not a checkpoint folder: "
    if main in revs or len(revs) == 1:
        rev = main if main in revs else revs[0]
        why = "refs/main's revision" if rev == main else "its one revision"
        return head + f"pass its snapshot folder {os.path.join(snaps, rev)!r} ({why}; what snapshot_download returns)"
    if revs:
        return head + f"pass one of its snapshot folders {os.path.join(snaps, '<rev>')!r}: {revs}"
    return head + "it holds no snapshot (an interrupted download?): download it with huggingface_hub.snapshot_download"


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


def missing_why(file: str) -> str:
    """Why ``file``, no regular file, cannot be read: ``"does not exist"``, ``"is a broken symlink to <target> ..."``
    (a Hugging Face cache snapshot whose blob is missing: an interrupted download, round 68) or ``"is not a file"``."""
    if os.path.islink(file) and not os.path.exists(file):
        return (f"is a broken symlink to {os.readlink(file)} (an interrupted download? download the checkpoint again, "
                "e.g. huggingface_hub.snapshot_download)")
    return "is not a file" if os.path.exists(file) else "does not exist"


#: what a Git LFS pointer file starts with (a clone made without git-lfs holds these in place of the weights)
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"
#: a safetensors dtype -> bits per element: a tensor's byte range must hold its shape (as safetensors checks on open)
_ST_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
            "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4,
            "F6_E2M3": 6, "F6_E3M2": 6}


def _check_bytes(file: str, size: int) -> None:
    """A missing, empty or Git LFS pointer ``file`` is refused naming what it is (round 68: a raw
    ``FileNotFoundError`` for a broken symlink, "unpack requires a buffer of 8 bytes" for the others)."""
    if not os.path.isfile(file):
        raise CheckpointNotFoundError(f"checkpoint file {file} {missing_why(file)}")
    with open(file, "rb") as f:
        head = f.read(len(_LFS_POINTER))
    if head == _LFS_POINTER:
        raise ValueError(f"{file} is a Git LFS pointer file ({size} bytes), not the weights: the checkpoint was cloned "
                         "without git-lfs; fetch them with `git lfs install && git lfs pull` in the clone, or download "
                         "the checkpoint with huggingface_hub.snapshot_download(repo_id)")
    if size == 0:
        raise ValueError(f"{file} is empty (0 bytes), not a .safetensors file (an interrupted download or copy?): "
                         "download or copy it again")


def read_header(file: str) -> dict[str, tuple[str, int, int]]:
    """key -> (dtype, start, end byte offsets) of one ``.safetensors`` file, from its header alone.

    A truncated or corrupt file (a tensor whose shape and dtype need other bytes than its offsets hold, as safetensors
    refuses on open), an empty one or a Git LFS pointer raises ``ValueError`` naming it; a missing file or a broken
    symlink :class:`CheckpointNotFoundError`."""
    size = os.path.getsize(file) if os.path.isfile(file) else 0
    _check_bytes(file, size)
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
            _check_extent(key, info, start, end)
            out[key] = (info["dtype"], start, end)
        return out
    except (ValueError, KeyError, TypeError, struct.error) as err:
        raise ValueError(f"{file} is not a readable .safetensors file (truncated or corrupt?): {err}") from None


def _check_extent(key: str, info: dict, start: int, end: int) -> None:
    """A tensor's shape x dtype size is the byte range its offsets give (round 68: inspect showed a header that
    load_moe_layers refused, as safetensors does on open)."""
    shape, bits = info["shape"], _ST_BITS.get(info["dtype"])
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"tensor {key!r} has shape {shape!r}, expected a list of sizes")
    if bits is not None and math.prod(shape) * bits != 8 * (end - start):
        raise ValueError(f"tensor {key!r} of shape {shape} and dtype {info['dtype']} needs "
                         f"{math.prod(shape) * bits / 8:g} bytes, but its data offsets [{start}, {end}] hold "
                         f"{end - start}")


def checkpoint_files(path: str) -> dict[str, str]:
    """key -> safetensors file, in transformers' order: ``model.safetensors`` alone where an index is beside it
    (transformers reads it and not the index: round 68, moekit followed the index), else
    ``model.safetensors.index.json``, else every ``*.safetensors`` file listed (a key in two of them refused)."""
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single) and os.path.isfile(index):
        return dict.fromkeys(read_header(single), single)
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
