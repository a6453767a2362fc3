"""Spawn one torch.distributed group (gloo on CPU, NCCL on GPUs) and run many named checks in it.

Each check runs on every rank; comparisons are recorded (never raised mid-check, so no rank leaves a
collective early) and raised at the end of the check. Results come back as one JSON file per rank.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class Ctx:
    """Per-rank context handed to every check."""

    def __init__(self, rank: int, world: int, device: torch.device, exact: bool, backend: str):
        self.rank, self.world, self.device = rank, world, device
        self.exact = exact  # bit-exactness expected of the all-to-all path (torch reference on CPU)
        self.experts_backend = backend
        self.world_group = dist.group.WORLD
        self.groups: dict[str, object] = {}
        self.failures: list[str] = []
        if world == 4:  # rank = 2·ep_rank + tp_rank
            for name, ranks in (("tp0", [0, 1]), ("tp1", [2, 3]), ("ep0", [0, 2]), ("ep1", [1, 3])):
                self.groups[name] = dist.new_group(ranks)

    def expect(self, ok: bool, what: str) -> None:
        if not ok:
            self.failures.append(f"rank {self.rank}: {what}")

    def expect_close(self, got: torch.Tensor, ref: torch.Tensor, what: str, exact: bool = False, atol=1e-5, rtol=1e-5):
        if got.shape != ref.shape or got.dtype != ref.dtype:
            self.failures.append(f"rank {self.rank}: {what}: shape/dtype {got.shape} {got.dtype} vs {ref.shape} {ref.dtype}")
            return
        if exact:
            if not torch.equal(got, ref):
                diff = (got.float() - ref.float()).abs().max().item() if got.numel() else 0.0
                self.failures.append(f"rank {self.rank}: {what}: not bit-exact (max diff {diff:.3e})")
            return
        if ref.dtype in (torch.bfloat16, torch.float16):
            err, r = got.float() - ref.float(), ref.float()
            rms = (err.pow(2).mean().sqrt() / r.pow(2).mean().sqrt().clamp_min(1e-12)).item() if r.numel() else 0.0
            mx = err.abs().max().item() if r.numel() else 0.0
            ok = rms <= 1e-2 and mx <= 3e-2 * max(r.abs().max().item() if r.numel() else 0.0, 1e-6)
            if not ok:
                self.failures.append(f"rank {self.rank}: {what}: bf16 rel rms {rms:.2e}, max err {mx:.2e}")
        elif not torch.allclose(got, ref, atol=atol, rtol=rtol):
            self.failures.append(f"rank {self.rank}: {what}: max diff {(got - ref).abs().max().item():.3e}")


def _worker(rank, world, init_file, backend, out_dir, check_module, names):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    results = {}
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
        else:
            device = torch.device("cpu")
        # a rank that fails mid-check leaves its peers in a collective: let that collective time out
        # (and report) instead of hanging until the harness kills the group
        dist.init_process_group(
            backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=float(os.environ.get("MOEKIT_DIST_COLLECTIVE_TIMEOUT", "60"))),
        )
        import importlib

        mod = importlib.import_module(check_module)
        exact = device.type == "cpu"
        experts_backend = mod.experts_backend(device)
        ctx = Ctx(rank, world, device, exact, experts_backend)
        for name in names:
            ctx.failures = []
            results[name] = "started, never finished (a collective hung?)"
            _dump(out_dir, rank, results)
            try:
                mod.CHECKS[name](ctx)
                results[name] = "ok" if not ctx.failures else "\n".join(ctx.failures)
            except Exception:
                results[name] = traceback.format_exc()
            _dump(out_dir, rank, results)
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        results["__setup__"] = traceback.format_exc()
    _dump(out_dir, rank, results)


def _dump(out_dir, rank, results) -> None:
    tmp = os.path.join(out_dir, f"rank{rank}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(results, f)
    os.replace(tmp, os.path.join(out_dir, f"rank{rank}.json"))


def _collect(out_dir: str, world: int) -> dict:
    merged: dict[str, list[str]] = {}
    for r in range(world):
        path = os.path.join(out_dir, f"rank{r}.json")
        if not os.path.exists(path):
            merged.setdefault("__setup__", []).append(f"[rank {r}] wrote no results")
            continue
        with open(path) as f:
            for name, res in json.load(f).items():
                merged.setdefault(name, []).append(res if res == "ok" else f"[rank {r}] {res}")
    return {n: ("ok" if all(x == "ok" for x in v) else "\n".join(x for x in v if x != "ok")) for n, v in merged.items()}


def run_checks(world: int, names: list[str], check_module: str, backend: str = "gloo", timeout: float = 240) -> dict:
    """Spawn ``world`` ranks, run ``names``; returns {name: "ok" or the failures of every rank}."""
    out_dir = tempfile.mkdtemp(prefix="moekit-dist-")
    init_file = os.path.join(out_dir, "init")
    ctx = mp.start_processes(
        _worker,
        args=(world, init_file, backend, out_dir, check_module, names),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    import time

    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            res = _collect(out_dir, world)
            res["__setup__"] = f"distributed checks (world {world}) did not finish in {timeout} s: " + repr(
                {n: v for n, v in res.items() if v != "ok"}
            )
            return res
    return _collect(out_dir, world)


_CACHE: dict = {}


def world_cases(module, world: int) -> list[str]:
    """The checks of a checks ``module`` (its ``WORLD``: name -> world sizes) that run at ``world``."""
    return [n for n, worlds in module.WORLD.items() if world in worlds]


def cached_results(module, world: int, backend: str = "gloo") -> dict:
    """:func:`run_checks` of ``module``'s checks at ``world``, once per process (every test of a runner file reads the
    one result); the bound: ``$MOEKIT_DIST_TIMEOUT`` seconds (240)."""
    key = (module.__name__, world, backend)
    if key not in _CACHE:
        _CACHE[key] = run_checks(world, world_cases(module, world), module.__name__, backend=backend,
                                 timeout=float(os.environ.get("MOEKIT_DIST_TIMEOUT", "240")))
    return _CACHE[key]


def assert_ok(res: dict, name: str) -> None:
    """The check ``name`` of a :func:`run_checks` result passed on every rank (else the failure it reported)."""
    assert "__setup__" not in res, res["__setup__"]
    assert name in res, f"check {name} did not report"
    assert res[name] == "ok", res[name]
