"""The untuned configs side by side: the experts step under the heuristic as every GPU gets it (``old``: no compute
capability; 4-bit: swapped Triton decode tiles up to 16 rows per expert, then the unquantised tiles; fp8: swapped
Triton decode tiles), the sm_90 heuristic (``sm90``; 4-bit: ``triton_configs.w4_sm90_tiles``, round 36: the
register-operand Gluon GEMMs; fp8 decode: ``triton_configs.fp8_sm90_decode``, round 37: the Gluon decode GEMMs as
programmatic dependent launches), and the device table's tuned config where it has the shape. ``--probe`` adds fp8
decode forms to choose from (``FP8_PROBE``). Each point's variants are timed in a CUDA graph (median µs), alternated
``--rounds`` times, and their outputs compared bit for bit against the first variant's.

    PYTHONPATH=src python benchmarks/heuristic_ab.py --shapes mixtral-8x7b,longcat-flash,kimi-k2 \
        --formats mxfp4,int4 --out ab.json
    PYTHONPATH=src python benchmarks/heuristic_ab.py --shapes longcat-flash,kimi-k2,glm-4.5 --formats fp8 \
        --tokens 1,2,4,8,16,32 --probe --out ab.json

Shapes beyond the benchmark models (``EXTRA``): ``kimi-k2`` (DeepSeek-V3's layer with 384 experts; Kimi-K2 ships fp8
block and int4 group-32 experts), ``glm-4.5`` (160 experts, H 5120, I 1536), ``minimax-m2`` (256 experts, H 3072,
I 1536) and ``qwen3-235b`` (128 experts, H 4096, I 1536), which ship fp8 block checkpoints.
"""

from __future__ import annotations

import sys

import torch

from kernel_profile import experts_step  # benchmarks/: the script's own folder
from moekit._argparse import OneLineParser, choice_list, int_list, out_file, positive_int
from moekit.benchmarking.shapes import EXTRA_MODELS, MODELS, get_shape
from moekit.ops import triton_configs as tc
from moekit.ops import triton_experts_quant as tq
from quant_probe import routing_sets, save_rows, shape_weights, time_alternated
from swap_probe import FORMATS, quantise

#: shapes beyond the benchmark models (top-k softmax routing where the model's own router differs: the experts step
#: reads only ids and weights)
EXTRA = {"kimi-k2": MODELS["deepseek-v3"].replace(name="kimi-k2", E=384),
         "glm-4.5": MODELS["qwen3-30b-a3b"].replace(name="glm-4.5", E=160, H=5120, I=1536),
         "minimax-m2": MODELS["qwen3-30b-a3b"].replace(name="minimax-m2", E=256, H=3072, I=1536),
         "qwen3-235b": MODELS["qwen3-30b-a3b"].replace(name="qwen3-235b", E=128, H=4096, I=1536)}


def _dec(part: dict, **kw) -> dict:
    return {**part, "gluon_dec": 1, **kw}


#: fp8 decode forms for ``--probe``, each from the old heuristic's swapped config ``h``: programmatic dependent
#: launches alone, the Gluon decode w2 alone, both Gluon decode GEMMs on the heuristic's tiles, DeepSeek-V3's T = 1
#: tiles (w13 BN 128, 8 warps, 5 stages; w2 BN 64, 3 stages) and Qwen3's (w13 BN 64, 6 stages; w2 BN 64, 4 stages)
FP8_PROBE = {
    "pdl": lambda h: {**h, "pdl": True},
    "w2dec": lambda h: {**h, "pdl": True, "w2": _dec(h["w2"])},
    "dec": lambda h: {**h, "pdl": True, "w13": _dec(h["w13"], BN=64), "w2": _dec(h["w2"])},
    "ds": lambda h: {**h, "pdl": True, "w13": _dec(h["w13"], BN=128, num_warps=8, num_stages=5),
                     "w2": _dec(h["w2"], BN=64, num_stages=3)},
    "q3": lambda h: {**h, "pdl": True, "w13": _dec(h["w13"], BN=64, num_stages=6),
                     "w2": _dec(h["w2"], BN=64, num_stages=4)},
}


def configs(dev, m, t: int, spec, probe: bool = False) -> dict[str, dict]:
    """{variant: config} at ``t`` tokens: ``old`` / ``sm90`` heuristics, ``table`` where the device table has
    the shape, with ``probe`` (fp8) the ``FP8_PROBE`` forms."""
    name, sms = torch.cuda.get_device_name(dev), torch.cuda.get_device_properties(dev).multi_processor_count
    cap = tc.heuristic_capability(torch.cuda.get_device_properties(dev))  # as the runtime lookup keys on it
    key = None if spec is None else spec.key  # bf16: no format key
    args = (t, m.E, m.H, m.I, m.K, torch.bfloat16, sms, key)
    out = {"old": tc.heuristic_config(*args), "sm90": tc.heuristic_config(*args, cap)}
    table = tc.lookup_config(name, tc.shape_key(m.E, m.H, m.I, m.K, torch.bfloat16, m.gated, key), t)
    if table is not None:
        out["table"] = table
    if probe and key is not None and key.startswith("fp8"):
        out.update({k: f(out["old"]) for k, f in FP8_PROBE.items()})
    return {k: c if spec is None else spec.fix_config(c, torch.bfloat16) for k, c in out.items()}


def main(argv=None) -> int:
    ap = OneLineParser(prog="heuristic_ab.py", description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", type=choice_list([*MODELS, *EXTRA_MODELS, *EXTRA], "shapes"),
                    default="mixtral-8x7b,longcat-flash,kimi-k2", help="comma-separated shapes")
    ap.add_argument("--formats", type=choice_list(list(FORMATS), "formats"), default="mxfp4,int4",
                    help="comma-separated weight formats")
    ap.add_argument("--tokens", type=int_list, default="1,8,64,256,1024,4096,16384", help="comma-separated T")
    ap.add_argument("--rounds", type=positive_int, default=2, help="alternations of the variants (>= 1)")
    ap.add_argument("--probe", action="store_true", help="fp8: time the FP8_PROBE decode forms too")
    ap.add_argument("--out", type=out_file, default=None, help="JSON file of the rows (written at the end)")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("heuristic_ab.py: error: needs a CUDA GPU (it times CUDA graphs)", file=sys.stderr)
        return 1
    dev = torch.device("cuda")
    rows = []
    for sname in a.shapes:
        m = EXTRA.get(sname) or get_shape(sname)  # the benchmark shapes and moekit's EXTRA_MODELS
        torch.cuda.empty_cache()
        weights = shape_weights(m, dev)
        for fname in a.formats:
            fmt = FORMATS[fname]  # "bf16": None (the unquantised kernels)
            spec = None if fmt is None else tq.QuantSpec.of(fmt)
            q = None if fmt is None else quantise(weights[0], weights[1], fmt)
            for t in a.tokens:
                sets = routing_sets(m, t, 4, dev)
                cfgs = configs(dev, m, t, spec, a.probe)
                fns = {k: experts_step(m, weights, q, spec, c) for k, c in cfgs.items()}
                ref = None
                same = {}
                for k, fn in fns.items():
                    out = fn(*sets[0])
                    ref = out if ref is None else ref
                    same[k] = bool(torch.equal(out, ref))
                times = time_alternated(fns, sets, a.rounds)
                line = "  ".join(f"{k} {'/'.join(f'{u:.1f}' for u in v)}" for k, v in times.items())
                gain = min(times["old"]) / min(times["sm90"])
                print(f"{sname:14s} {fname:5s} T={t:6d} | {line} | old/sm90 {gain:.2f}x"
                      + ("" if all(same.values()) else f" | BITS DIFFER {same}"), flush=True)
                rows.append(dict(model=sname, fmt=fname, tokens=t, us=times, same_bits=same, configs=cfgs))
            del q
    save_rows(a.out, dev, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
