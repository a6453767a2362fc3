"""Transformers models with real layer widths (few layers, random bf16 weights): moekit vs grouped_mm.

For each model shape (Qwen3-MoE 30B-A3B, DeepSeek-V3; MoE widths from ``moekit.benchmarking.MODELS``)
this times, with ``moekit.benchmarking.time_events`` (CUDA events, median after warm-up), the whole-model
forward (``use_cache=False``) and the last MoE block alone (eagerly, and replayed in a CUDA graph with
``time_graph`` where the block can be captured), at batch x seq = 1x1, 8x1, 64x1, 1x1024, 1x2048, for
three experts paths:

- ``grouped_mm``: transformers' default experts implementation (its own router);
- ``moekit_switch``: ``experts_implementation="moekit"`` (transformers' router, moekit experts);
- ``patched``: :func:`moekit.integrations.transformers.patch` (moekit router + experts + shared).

It also records the largest relative logit difference of each moekit path against grouped_mm, and for the
block, calls enqueued back to back: the host's enqueue ms per call and the wall ms per call until the last
finished (``moe_block_host_ms``, ``moe_block_stream_ms``).

    PYTHONPATH=src python benchmarks/bench_transformers.py [--out FILE] [--tiny]

``--tiny`` shrinks every width (a CPU smoke test of the script itself). ``--graph-tokens N`` patches with
``eager_graph_tokens=N`` (default: :data:`moekit.experts.graphed.MODEL_GRAPH_TOKENS`). Writes
``benchmarks/results/transformers-<gpu>-<date>.json`` by default.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback

import torch

from moekit._argparse import OneLineParser, choice_list, unwritable_folder
from moekit.benchmarking import ModelShape, get_shape, time_events, time_graph
from moekit.benchmarking.eager import back_to_back

SHAPES = [(1, 1), (8, 1), (64, 1), (1, 1024), (1, 2048)]  # batch x seq: T <= 64 and T >= 1024 (issue #11 targets)


def _qwen3_moe(m: ModelShape) -> dict:
    return dict(hidden_size=m.H, moe_intermediate_size=m.I, num_experts=m.E, num_experts_per_tok=m.K,
                norm_topk_prob=m.renorm)


def _deepseek_v3(m: ModelShape) -> dict:
    return dict(hidden_size=m.H, moe_intermediate_size=m.I, n_routed_experts=m.E, num_experts_per_tok=m.K,
                n_group=m.groups, topk_group=m.topk_group, routed_scaling_factor=m.scale, norm_topk_prob=m.renorm)


def _gpt_oss(m: ModelShape) -> dict:
    return dict(hidden_size=m.H, intermediate_size=m.I, num_local_experts=m.E, num_experts_per_tok=m.K)


#: key -> (shape in moekit.benchmarking.MODELS, config class, model class, MoE kwargs of the shape, the rest)
MODELS = {
    "qwen3_moe_30b_a3b": (
        "qwen3-30b-a3b", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", _qwen3_moe,
        dict(intermediate_size=6144, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
             vocab_size=151936, num_hidden_layers=2, max_position_embeddings=4096),
    ),
    "deepseek_v3": (
        "deepseek-v3", "DeepseekV3Config", "DeepseekV3ForCausalLM", _deepseek_v3,
        dict(intermediate_size=18432, n_shared_experts=1, num_attention_heads=128, num_key_value_heads=128,
             q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
             vocab_size=129280, num_hidden_layers=2,
             first_k_dense_replace=1,  # layer 0 dense, layer 1 MoE: one MoE layer of real size (22.5 GB bf16)
             max_position_embeddings=4096),
    ),
    "gpt_oss_120b": (  # gpt-oss's adapter runs the gate itself and passes the logits (router_scores returned)
        "gpt-oss-120b", "GptOssConfig", "GptOssForCausalLM", _gpt_oss,
        dict(num_attention_heads=64, num_key_value_heads=8, head_dim=64, vocab_size=201088, num_hidden_layers=2,
             max_position_embeddings=4096),
    ),
}

TINY = dict(
    hidden_size=64, intermediate_size=96, moe_intermediate_size=32, vocab_size=128, num_attention_heads=4,
    num_key_value_heads=4, head_dim=16, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
    qk_nope_head_dim=8, v_head_dim=16, num_experts=16, n_routed_experts=16, num_local_experts=16,
)


def _moe_block(model):
    return model.model.layers[-1].mlp


def _bench_variant(model, name, device, hidden, vocab, shapes, results, ref_logits):
    block = _moe_block(model)
    out = {}
    for b, s in shapes:
        g = torch.Generator(device="cpu").manual_seed(b * 100003 + s)
        ids = torch.randint(0, vocab, (b, s), generator=g).to(device)
        x = (torch.randn(b, s, hidden, generator=g) * 0.5).to(device=device, dtype=torch.bfloat16)
        iters = 10 if b * s >= 1024 else 30
        with torch.inference_mode():
            logits = model(input_ids=ids, use_cache=False).logits
            key = f"{b}x{s}"
            if ref_logits is not None and key in ref_logits:
                ref = ref_logits[key]
                diff = ((logits.float() - ref).abs().max() / ref.abs().max()).item()
            else:
                diff = None
            full = time_events(lambda: model(input_ids=ids, use_cache=False), iters, warmup=3, device=device)
            moe = time_events(lambda: block(x), iters, warmup=3, device=device)
            block(x)  # back to back from a drained stream
            if device.type == "cuda":
                torch.cuda.synchronize()
            host, stream = (v / 1e3 for v in back_to_back(lambda: block(x), [()], iters, device.type == "cuda"))
            graph = _graph_ms(block, x, device)
        out[f"{b}x{s}"] = dict(model_ms=round(full, 4), moe_block_ms=round(moe, 4), moe_block_graph_ms=graph,
                               moe_block_host_ms=round(host, 4), moe_block_stream_ms=round(stream, 4),
                               max_rel_logit_diff_vs_grouped_mm=diff)
        if name == "grouped_mm":
            results.setdefault("_ref", {})[f"{b}x{s}"] = logits.float()
    return out


def _graph_ms(block, x, device):
    """The MoE block replayed in a CUDA graph (ms per call), or an error string if it cannot be captured."""
    if device.type != "cuda":
        return None
    try:
        return round(time_graph(lambda: block(x), [()], target_ms=10.0) / 1000.0, 4)
    except Exception as err:  # e.g. a host synchronisation inside the block
        return f"not capturable: {type(err).__name__}: {str(err)[:200]}"


def speedups(res: dict) -> list[str]:
    """patched / moekit_switch vs grouped_mm per shape: eager (MoE block) and graph (targets: >= 3x eager at
    T <= 64, >= 1.5x at T >= 1024)."""
    lines, ref = [], res["variants"].get("grouped_mm", {})
    for name in ("moekit_switch", "patched"):
        for key, row in res["variants"].get(name, {}).items():
            base = ref.get(key)
            if not isinstance(row, dict) or not isinstance(base, dict):
                continue
            eager = base["moe_block_ms"] / row["moe_block_ms"]
            g0, g1 = base.get("moe_block_graph_ms"), row.get("moe_block_graph_ms")
            graph = f"{g0 / g1:6.2f}x" if isinstance(g0, float) and isinstance(g1, float) else "   n/a"
            s0, s1 = base.get("moe_block_stream_ms"), row.get("moe_block_stream_ms")
            stream = f"{s0 / s1:6.2f}x" if s0 and s1 else "   n/a"
            lines.append(f"{name:13s} {key:7s} MoE block vs grouped_mm: eager {eager:6.2f}x  back to back {stream}  "
                         f"graph {graph}  (host {row.get('moe_block_host_ms')} ms per call)")
    return lines


def run_model(key, device, tiny, log, graph_tokens=None):
    import transformers

    from moekit.integrations.transformers import MoEBlockAdapter, patch, register

    shape_name, cfg_name, model_name, moe_kwargs, rest = MODELS[key]
    kw = {**moe_kwargs(get_shape(shape_name)), **rest}
    if tiny:
        kw.update({k: v for k, v in TINY.items() if k in kw})
    config = getattr(transformers, cfg_name)(**kw)
    t = time.time()
    with torch.device(device):
        model = getattr(transformers, model_name)._from_config(config, dtype=torch.bfloat16)
    model.eval()
    log(f"{key}: built in {time.time() - t:.1f}s, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params")
    shapes = SHAPES if not tiny else [(1, 1), (8, 1), (64, 1), (1, 64)]
    hidden, vocab = config.hidden_size, config.vocab_size
    res = {"config": {k: v for k, v in kw.items()}, "variants": {}}
    scratch = {}
    model.set_experts_implementation("grouped_mm")
    res["variants"]["grouped_mm"] = _bench_variant(model, "grouped_mm", device, hidden, vocab, shapes, scratch, None)
    log(f"{key} grouped_mm: {res['variants']['grouped_mm']}")
    ref = scratch.pop("_ref")
    register()
    try:
        model.set_experts_implementation("moekit")
        res["variants"]["moekit_switch"] = _bench_variant(model, "moekit_switch", device, hidden, vocab, shapes,
                                                          scratch, ref)
    except Exception as err:  # record and go on: the other variants still say something
        res["variants"]["moekit_switch"] = {"error": repr(err)[:500], "trace": traceback.format_exc()[-2000:]}
    log(f"{key} moekit_switch: {res['variants']['moekit_switch']}")
    model.set_experts_implementation("grouped_mm")
    names = patch(model, eager_graph_tokens=graph_tokens)  # None: MODEL_GRAPH_TOKENS
    adapters = [m for m in model.modules() if isinstance(m, MoEBlockAdapter)]
    backends = sorted({(a.moe.router.backend, a.moe.routed_experts.backend) for a in adapters})
    note = None
    try:  # a failure is recorded, not papered over: the patched layers are built as they are
        with torch.inference_mode():
            model(input_ids=torch.zeros(1, 4, dtype=torch.long, device=device), use_cache=False)
    except Exception as err:
        note = f"patched model failed with backends {backends}: {type(err).__name__}: {str(err)[:300]}"
    res["patched_blocks"] = names
    res["patched_backend"] = backends
    res["patched_note"] = note
    if note is None:
        res["variants"]["patched"] = _bench_variant(model, "patched", device, hidden, vocab, shapes, scratch, ref)
    else:
        res["variants"]["patched"] = {"error": note}
    log(f"{key} patched ({res['patched_backend']}, {note}): {res['variants']['patched']}")
    res["speedups"] = speedups(res)
    for line in res["speedups"]:
        log(f"{key} {line}")
    del model
    if device.type == "cuda":
        res["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return res


def _non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


def main(argv=None) -> int:
    ap = OneLineParser(prog="bench_transformers.py", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="output JSON file")
    ap.add_argument("--out-dir", default=None, help="directory for the default file name")
    ap.add_argument("--tiny", action="store_true", help="tiny widths (a CPU smoke test)")
    ap.add_argument("--models", type=choice_list(list(MODELS), "models"), default=",".join(MODELS),
                    help=f"comma-separated models (default: {','.join(MODELS)})")
    ap.add_argument("--graph-tokens", type=_non_negative_int, default=None,
                    help="patch(model, eager_graph_tokens=N), N >= 0 (default: MODEL_GRAPH_TOKENS, 2048)")
    args = ap.parse_args(argv)
    if args.out and os.path.isdir(args.out):  # checked before the models run, not when the JSON is written
        ap.error(f"argument --out: {args.out!r} is a folder; expected a JSON file")
    default_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    out_folder = os.path.dirname(os.path.abspath(args.out)) if args.out else (args.out_dir or default_dir)
    why = unwritable_folder(out_folder)  # (the default folder too: round 62, a read-only one failed after the run)
    if why:
        ap.error(f"argument {'--out' if args.out else '--out-dir'}: {why}")
    if not torch.cuda.is_available() and not args.tiny:  # real widths on the CPU: tens of GB and hours
        print("bench_transformers.py: error: needs a CUDA GPU for real widths; --tiny runs tiny ones on the CPU",
              file=sys.stderr)
        return 1
    import transformers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name().replace(" ", "_") if device.type == "cuda" else "cpu"
    date = datetime.date.today().isoformat()
    out_dir = args.out_dir or default_dir
    out_path = args.out or os.path.join(out_dir, f"transformers-{gpu}-{date}.json")
    result = dict(
        device=gpu,
        date=date,
        torch=torch.__version__,
        transformers=transformers.__version__,
        python=platform.python_version(),
        dtype="bfloat16",
        timing="CUDA events, median of 30 (10 at >= 1024 tokens) after 3 warm-up calls",
        models={},
    )
    failed = []
    for key in args.models:
        try:
            result["models"][key] = run_model(key, device, args.tiny, print, args.graph_tokens)
        except Exception as err:
            result["models"][key] = {"error": repr(err)[:500], "trace": traceback.format_exc()[-3000:]}
            print(f"{key}: FAILED {err!r}")
            failed.append(key)
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
    print("wrote", out_path)
    if failed:
        print(f"bench_transformers.py: error: {', '.join(failed)} failed (see the JSON)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
