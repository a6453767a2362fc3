"""A training step through one transformers MoE block: moekit (patched) vs transformers' ``grouped_mm`` experts.

For each model shape (one decoder layer of real widths, random bf16 weights, ``model.train()``), and each token
count T (one sequence of T tokens), times with CUDA events (median after warm-up) the block's

- ``fwd``: forward under ``torch.no_grad()`` (inference, for scale);
- ``train``: forward + backward of ``(out · dy).sum()``, every parameter requiring grad (full fine-tuning: the
  expert stacks' gradients included), ``.grad`` set to None before each step;
- ``train_frozen``: the same with the expert stacks frozen (LoRA-style: gradients of the input, router and the rest);

for ``grouped_mm`` (transformers' default experts), ``patched`` (:func:`moekit.integrations.transformers.patch`:
moekit's kernels forward, its grouped-GEMM backward) and ``patched_loop`` (the backward's per-expert loop, the path
taken where ``torch._grouped_mm`` cannot run). It also records the gradients' relative RMS difference between
``patched`` and ``grouped_mm`` (input, router weight, expert stacks).

    PYTHONPATH=src python benchmarks/train_step.py [--tokens 1024,4096] [--models qwen3-30b-a3b,mixtral-8x7b]
        [--out FILE] [--tiny]

``--tiny`` shrinks the widths (a CPU smoke test of the script). Writes ``benchmarks/results/train-<gpu>-<date>.json``.
"""

from __future__ import annotations

import copy
import datetime
import json
import platform
from pathlib import Path

import torch

from moekit._argparse import OneLineParser, choice_list, int_list, out_file, unwritable_folder
from moekit.benchmarking import get_shape, time_events

#: model -> (config class, model class, MoE keywords of the shape, block path in the model)
MODELS = {
    "qwen3-30b-a3b": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                      lambda m: dict(hidden_size=m.H, moe_intermediate_size=m.I, num_experts=m.E,
                                     num_experts_per_tok=m.K, norm_topk_prob=m.renorm, intermediate_size=6144,
                                     num_attention_heads=32, num_key_value_heads=4, head_dim=128)),
    "mixtral-8x7b": ("MixtralConfig", "MixtralForCausalLM",
                     lambda m: dict(hidden_size=m.H, intermediate_size=m.I, num_local_experts=m.E,
                                    num_experts_per_tok=m.K, num_attention_heads=32, num_key_value_heads=8)),
}
TINY = dict(hidden_size=64, moe_intermediate_size=32, intermediate_size=96, num_experts=16, num_local_experts=8,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def _block(cfg_name, model_name, kw, device):
    import transformers

    config = getattr(transformers, cfg_name)(**kw, vocab_size=256, num_hidden_layers=1)
    with torch.device(device):
        model = getattr(transformers, model_name)._from_config(config, dtype=torch.bfloat16)
    model.set_experts_implementation("grouped_mm")
    return model.train()


def _out(block, x):
    out = block(x)
    return out[0] if isinstance(out, tuple) else out


def _step(block, x, dy):
    def run():
        for p in block.parameters():
            p.grad = None
        x.grad = None
        (_out(block, x).float() * dy).sum().backward()
    return run


def _stacks(block):
    """The block's expert stacks (transformers' or moekit's names): [(name, parameter)]."""
    return [(n, p) for n, p in block.named_parameters() if p.dim() == 3]


def _rel_rms(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def run(name, tokens, device, tiny, log):
    from moekit.integrations.transformers import patch
    from moekit.ops import experts_grad

    cfg_name, model_name, kw_of = MODELS[name]
    kw = kw_of(get_shape(name))
    if tiny:
        kw.update({k: v for k, v in TINY.items() if k in kw})
    ref = _block(cfg_name, model_name, kw, device)
    mine = copy.deepcopy(ref)
    patch(mine)
    blocks = {"grouped_mm": ref.model.layers[0].mlp, "patched": mine.model.layers[0].mlp}
    hidden = kw["hidden_size"]
    rows = {}
    for t in tokens:
        g = torch.Generator(device="cpu").manual_seed(t)
        x = (torch.randn(1, t, hidden, generator=g) * 0.5).to(device=device, dtype=torch.bfloat16).requires_grad_()
        dy = torch.randn(1, t, hidden, generator=g).to(device)
        iters = 5 if t >= 4096 else 10
        row, grads = {}, {}
        for variant, block in blocks.items():
            with torch.no_grad():
                row[f"{variant}_fwd_ms"] = time_events(lambda: _out(block, x), iters, warmup=2, device=device)
            step = _step(block, x, dy)
            row[f"{variant}_train_ms"] = time_events(step, iters, warmup=2, device=device)
            grads[variant] = [x.grad.clone()] + [p.grad.clone() for _, p in _stacks(block)] + [
                p.grad.clone() for n, p in block.named_parameters() if "gate" in n and p.dim() == 2]
            stacks = [p for _, p in _stacks(block)]
            for p in stacks:
                p.requires_grad_(False)
            row[f"{variant}_train_frozen_ms"] = time_events(step, iters, warmup=2, device=device)
            for p in stacks:
                p.requires_grad_(True)
        saved = experts_grad.grouped_ok
        experts_grad.grouped_ok = lambda *a: False  # the per-expert loop backward
        try:
            row["patched_loop_train_ms"] = time_events(_step(blocks["patched"], x, dy), max(2, iters // 2), warmup=1,
                                                       device=device)
        finally:
            experts_grad.grouped_ok = saved
        row["grad_rel_rms_vs_grouped_mm"] = [round(_rel_rms(a, b), 5)
                                             for a, b in zip(grads["patched"], grads["grouped_mm"])]
        row = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
        log(f"{name} T={t}: {row}")
        rows[str(t)] = row
    return {"config": kw, "tokens": rows}


def main(argv=None) -> int:
    # (round 62: the arguments and the output checked before the run, one line each; a folder as --out failed after it)
    ap = OneLineParser(prog="train_step.py", description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int_list, default=[1024, 4096], help="comma-separated token counts")
    ap.add_argument("--models", type=choice_list(list(MODELS), "models"), default=list(MODELS))
    ap.add_argument("--out", type=out_file, default=None, help="output JSON file")
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name().replace(" ", "_") if device.type == "cuda" else platform.machine()
    out = Path(args.out or f"benchmarks/results/train-{gpu}-{datetime.date.today()}.json")
    why = unwritable_folder(out.parent)
    if why:
        ap.error(f"the default output {str(out)!r}: {why}")
    res = {"device": gpu, "torch": torch.__version__, "models": {}}
    for name in args.models:
        res["models"][name] = run(name, args.tokens, device, args.tiny, print)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
