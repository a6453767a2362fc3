"""Reading a checkpoint for :func:`moekit.load_moe_layers`: its files opened once each (:class:`Reader`, errors
naming the file), the bytes-read progress bar (:func:`progress_bar`) and torch's intra-op threads held at one while
tensors are copied (:func:`one_thread`)."""

from __future__ import annotations

import contextlib
import os
import sys
import threading

import torch

from .files import CheckpointNotFoundError, missing_why, read_header


def _read(handle, key: str) -> torch.Tensor:
    """One tensor from an open safetensors file (a seam for tests that count live bytes)."""
    return handle.get_tensor(key)


class Reader:
    """The checkpoint's files, each opened once (lazily) and released once read (:meth:`release`); errors name the
    file."""

    def __init__(self, files: dict[str, str]):
        self.files = files
        self.order = {f: i for i, f in enumerate(sorted(set(files.values())))}
        self.headers: dict[str, dict] = {}
        self.handles: dict[str, object] = {}

    def _header(self, key: str) -> tuple[str, int, int]:
        f = self.files[key]
        if f not in self.headers:
            if not os.path.isfile(f):
                raise CheckpointNotFoundError(f"checkpoint shard {f} (holding {key!r}) {missing_why(f)}")
            self.headers[f] = read_header(f)
        if key not in self.headers[f]:
            raise KeyError(f"checkpoint key {key!r} is listed for {f} but the file does not hold it")
        return self.headers[f][key]

    def position(self, key: str) -> tuple[int, int]:
        return self.order[self.files[key]], self._header(key)[1]

    def nbytes(self, key: str) -> int:
        _, start, end = self._header(key)
        return end - start

    def read(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        f = self.files[key]
        self._header(key)
        if f not in self.handles:
            try:
                self.handles[f] = safe_open(f, framework="pt", device="cpu")
            except Exception as err:  # safetensors raises its own error types
                raise ValueError(f"{f} is not a readable .safetensors file: {err}") from None
        try:
            return _read(self.handles[f], key)
        except Exception as err:
            raise ValueError(f"{f}: cannot read tensor {key!r}: {err}") from None

    def release(self, f: str) -> None:
        """Unmap file ``f`` (its tensors read are all copied): a mapping keeps the pages read through it in the
        process's memory (round 66: every shard stayed mapped until the load ended, RSS grew by the whole
        checkpoint). The storage-order reads release each file as they move past it: each is still opened once."""
        self.handles.pop(f, None)

    def close(self) -> None:
        self.handles.clear()


class _NoBar:
    def update(self, n: int) -> None:
        pass


@contextlib.contextmanager
def progress_bar(total: int, progress: bool | None):
    if progress is False:
        yield _NoBar()
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, desc="moekit: loading MoE layers",
              disable=None if progress is None else False, file=sys.stderr) as bar:
        yield bar


#: per thread: loads in progress in it and its intra-op thread count before the first of them (see :func:`one_thread`)
_ONE_THREAD = threading.local()


@contextlib.contextmanager
def one_thread():
    """Copies of checkpoint tensors are memory-bound and mostly small: with several intra-op threads they
    were 10x slower on a busy 2-core machine (thread wake-ups per 1 MB copy), never faster. Overlapping loads of one
    thread share one save and restore, by the first and the last of them (round 49: two overlapping loads left the
    process at 1 thread); each thread saves and restores its own count (round 65: torch's count is per thread with
    OpenMP, and a load ending in another thread than the first one's left that thread at 1). A thread that first uses
    torch while a load runs starts at 1 (torch's default for new threads then)."""
    local = _ONE_THREAD
    if getattr(local, "loads", 0) == 0:
        local.threads = torch.get_num_threads()
        torch.set_num_threads(1)
        local.loads = 0
    local.loads += 1
    try:
        yield
    finally:
        local.loads -= 1
        if local.loads == 0:
            torch.set_num_threads(local.threads)
