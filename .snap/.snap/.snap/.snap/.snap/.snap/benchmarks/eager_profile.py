"""Where the host time of an eager ``FusedMoE`` call goes (issue #11 item 1), piece by piece, on a GPU.

For Qwen3-30B-A3B and DeepSeek-V3 (or ``--models``) at T = 1 and 8 (``--tokens``), with the layer built
as ``moekit.benchmarking.bench.build_layer`` builds it, host µs per call (median of 5 runs of 200 calls
back to back, ``perf_counter``, no synchronisation inside) of:

- ``layer``: the full ``layer(x, logits)`` (whole-forward graph replay); ``layer-nograph``: the same
  weights with ``eager_graph_tokens=0`` (plain kernels)
- the pieces of a replay: ``key+lookup``, ``graph_state`` (the cheap state), ``graph_lock`` (take + release),
  ``graph_state-old`` (the former generator-built state, for comparison), ``is_compiling``, ``is_capturing``,
  ``grad_check``, ``copy_x``, ``copy_logits``, ``foreach_copy`` (both in one op), ``replay``,
  ``clone``, ``empty_like``, the raw replay's parts where the graph has one (``raw_set_in``: one update of the copy-in node,
  ``raw_launch``: the wrapper graph, ``raw_copy_launch``: one launch of the copy kernel, round 26's form,
  ``raw_stream``, ``raw_replay`` with its output copy, ``raw_replay_nocopy``), and the former
  per-call checks ``checks-old`` (``check_hidden`` + ``check_routed_input`` + ``check_tensor``)
- ``layer-torchops``: the full call with the raw replay switched off (the torch ops replay), then ``layer-again``:
  the first row again, so that drift within the run shows
- floors: ``linear`` (one ``F.linear`` [T, H] x [H, H]) and ``view`` (an empty op, ``x.view(-1)``)

and ``gpu``: GPU µs of the call (``time_graph``: the plain kernels captured in one CUDA graph). Each
piece is timed in its own try/except (errors are printed, the row gets ``null``). Writes a JSON list of
``{model, tokens, piece, host_us | gpu_us, error?}`` to ``--out``. About 30-50 s on an H200.

    PYTHONPATH=src python benchmarks/eager_profile.py --out eager_profile.json
"""

from __future__ import annotations

import itertools
import json
import sys
import traceback

import torch
import torch.nn.functional as F

import moekit
from moekit._checks import check_tensor
from moekit.runner_checks import check_hidden, check_routed_input
from moekit._argparse import OneLineParser, choice_list, int_list, out_file
from moekit.benchmarking import EXTRA_MODELS, MODELS, get_shape, time_graph
from moekit.benchmarking.bench import build_layer
from moekit.benchmarking.eager import time_host
from moekit.experts.graphed import tensor_key

DT = torch.bfloat16


def host_us(fn, calls: int = 200) -> float:
    """Host µs per ``fn()`` call: :func:`moekit.benchmarking.eager.time_host` (median of 5 blocks)."""
    return time_host(lambda: fn(), [()], calls=calls)


def old_state(layer) -> tuple:
    """The former per-call state (generators over parameters and buffers, data_ptr/dtype/shape)."""
    r, e = layer.router, layer.routed_experts
    tensors = (*e.parameters(recurse=False), *e.buffers(recurse=False), *r.buffers(recurse=False))
    return (r.indices_type, getattr(r, "spec", None), layer.routed_scaling_factor,
            *((t.data_ptr(), t.dtype, t.shape) for t in tensors))


def old_checks(layer, x, lg):
    check_hidden(layer, x)
    check_routed_input(layer, x)
    check_tensor("router_logits", lg)


def pieces(layer, plain, m, t):
    """[(piece, fn)] for ``t`` tokens; the layer's graph for this key is captured first."""
    dev = "cuda"
    x = torch.randn(t, m.H, device=dev, dtype=DT)
    lg = torch.randn(t, m.E + m.Z, device=dev)
    layer(x, lg)  # capture
    layer(x, lg)
    g = layer._graphs
    entry = g.lookup((tensor_key(x), tensor_key(lg)))
    if entry is None:
        raise RuntimeError(f"no whole graph captured for T={t} (plan: {layer._graph_plan and vars_of(layer)})")
    sx, sl = entry.inputs
    lin = torch.randn(m.H, m.H, device=dev, dtype=DT) * m.H**-0.5
    xs, ls = [sx], [sl]
    return [
        ("layer", lambda: layer(x, lg)),
        ("layer-nograph", lambda: plain(x, lg)),
        ("key+lookup", lambda: g.lookup((tensor_key(x), tensor_key(lg)))),
        ("graph_state", layer._graph_state),
        ("graph_lock", lambda: lock_round_trip(g.lock, x)),
        ("graph_state-old", lambda: old_state(layer)),
        ("is_compiling", torch.compiler.is_compiling),
        ("is_capturing", torch.cuda.is_current_stream_capturing),
        ("grad_check", lambda: torch.is_grad_enabled() and (x.requires_grad or lg.requires_grad)),
        ("checks-old", lambda: old_checks(layer, x, lg)),
        ("copy_x", lambda: sx.copy_(x)),
        ("copy_logits", lambda: sl.copy_(lg)),
        ("foreach_copy", lambda: torch._foreach_copy_(xs + ls, [x, lg])),
        ("replay", entry.graph.replay),
        ("clone", entry.out.clone),
        ("empty_like", lambda: torch.empty_like(entry.out)),
        *raw_pieces(entry, x, lg),
        ("layer-torchops", lambda: without_raw(layer, entry, x, lg)),
        ("layer-again", lambda: layer(x, lg)),
        ("linear", lambda: F.linear(x, lin)),
        ("view", lambda: x.view(-1)),
    ], (x, lg)


def lock_round_trip(lock, x):
    """One forward's take and release of the graphs' lock (round 49's per-call cost; round 51 trimmed it)."""
    if lock.take(x):
        lock.release()


def without_raw(layer, entry, x, lg):
    raw, entry.raw = entry.raw, None
    try:
        return layer(x, lg)
    finally:
        entry.raw = raw


def raw_pieces(entry, x, lg) -> list:
    """The raw replay's parts (``experts/graphed_raw.py``), where the entry has one."""
    raw = entry.raw
    if raw is None:
        print("no raw replay for this graph (no CUDA driver, or declined)")
        return []
    cu, stream = raw.cu, raw.cu.stream(raw.device)
    d0, n0, d1, n1 = raw._in_vals
    # the copy-in node's values alternate: each call is a real update
    flip = itertools.cycle([(d0, x.data_ptr(), n0, d1, lg.data_ptr(), n1), (d0, d0, n0, d1, d1, n1)])
    return [
        ("raw_set_in", lambda: cu.set(raw.graph_exec, raw._in, next(flip))),
        ("raw_launch", lambda: cu.launch(raw.graph_exec, stream)),
        ("raw_copy_launch", lambda: cu.copy(raw._in, stream)),  # round 26's form of a copy: one kernel launch
        ("raw_stream", lambda: cu.stream(raw.device)),
        ("raw_replay", lambda: raw.replay((x, lg), True)),
        ("raw_replay_nocopy", lambda: raw.replay((x, lg), False)),
    ]


def vars_of(layer) -> dict:
    p = layer._graph_plan
    return dict(whole_logits=p.whole_logits, whole_gate=p.whole_gate, folded=len(p.folded))


def main(argv=None) -> int:
    ap = OneLineParser(prog="eager_profile.py", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=out_file, required=True, help="JSON file to write")
    ap.add_argument("--models", type=choice_list([*MODELS, *EXTRA_MODELS], "shapes"),
                    default="qwen3-30b-a3b,deepseek-v3", help="comma-separated shapes")
    ap.add_argument("--tokens", type=int_list, default="1,8", help="comma-separated token counts")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("eager_profile.py: error: needs a CUDA GPU (it times the Triton path's host cost)", file=sys.stderr)
        return 1
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}; host µs per call (median of 5 x 200)")
    rows = []
    for name in args.models:
        m = get_shape(name)
        torch.manual_seed(0)
        try:
            with torch.no_grad():
                layer = build_layer(m, DT, "cuda")
                bias = getattr(layer.router, "e_score_correction_bias", None)
                plain = moekit.FusedMoE(m.E, m.K, m.H, m.I, params_dtype=DT, e_score_correction_bias=bias,
                                        device="cuda", backend="triton", eager_graph_tokens=0, **m.layer_kwargs())
                re = layer.routed_experts
                plain.routed_experts.adopt_weights(re.w13_weight, re.w2_weight, re.w13_bias, re.w2_bias)
        except Exception:
            traceback.print_exc()
            rows.append(dict(model=name, piece="build", error=traceback.format_exc(limit=3)))
            continue
        for t in args.tokens:
            with torch.no_grad():
                try:
                    calls, inputs = pieces(layer, plain, m, t)
                except Exception:
                    traceback.print_exc()
                    rows.append(dict(model=name, tokens=t, piece="setup", error=traceback.format_exc(limit=3)))
                    continue
                for piece, fn in calls:
                    row = dict(model=name, tokens=t, piece=piece, host_us=None)
                    try:
                        row["host_us"] = round(host_us(fn), 2)
                    except Exception as e:
                        row["error"] = f"{type(e).__name__}: {e}"
                        print(f"{name} T={t} {piece}: {row['error']}")
                    rows.append(row)
                    if row["host_us"] is not None:
                        print(f"{name:15s} T={t:2d} {piece:16s} host {row['host_us']:8.2f} us")
                row = dict(model=name, tokens=t, piece="gpu", gpu_us=None)
                try:
                    row["gpu_us"] = round(time_graph(layer, [inputs], target_ms=5.0), 2)
                    print(f"{name:15s} T={t:2d} {'gpu':16s} gpu  {row['gpu_us']:8.2f} us")
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {e}"
                    print(f"{name} T={t} gpu: {row['error']}")
                rows.append(row)
        del layer, plain
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
