"""Which 4-bit configs keep a probe row's bits (round 14 diagnostic, run in round 15: ``-r15-inv-probe.log``; it
showed the BLOCK_M 64 register-operand rows wrong, not merely batch-dependent, which ``rega_race_probe.py`` then
traced to the in-flight fragment race): the same T = 64 and T = 1024 batches under several configs, each against
the rows alone (the table's bucket-1 config), and the configs against each other. Run from the repository root on
a GPU: ``python benchmarks/inv_probe.py``."""

import copy
import sys

import torch

sys.path.insert(0, "tests/ops")
import test_batch_invariance_gpu as tb  # noqa: E402

from moekit.benchmarking import MODELS  # noqa: E402
from moekit.ops import triton_configs as tc  # noqa: E402
from moekit.ops import triton_experts_quant as tq  # noqa: E402
from moekit.ops.formats import Int4GroupFormat, Mxfp4Format  # noqa: E402
import moekit  # noqa: E402
from moekit.ops import gluon_w4  # noqa: E402

gluon_w4._REGA_MAX_BM = 64  # BLOCK_M 64 register-operand tiles (the launcher refused them before round 15)


def cfg(bm, rega, gluon=True, split=False):
    w = {"BK": 128, "BN": 64, "GROUP_M": 8, "SWAP": 1, "num_stages": 3, "num_warps": 4}
    if gluon:
        w = dict(w, gluon=1, gluon_rega=int(rega))
    return {"BLOCK_M": bm, "sum_pass": True, "w13_split": split, "w13": dict(w), "w2": dict(w)}


for name, fmt in (("deepseek-v3", Int4GroupFormat(32)), ("gpt-oss-120b", Mxfp4Format()),
                  ("deepseek-v3", Mxfp4Format())):
    m = MODELS[name]
    key = tq.QuantSpec.of(fmt).key
    _, table = tc.shape_table(torch.cuda.get_device_name(), tc.shape_key(m.E, m.H, m.I, m.K, tb.DT, m.gated, key))
    table = {int(b): c for b, c in table.items()}
    e, w1, w2, b1, b2 = tb._problem(m, 32)
    k = min(m.K, e)
    spec = tq.QuantSpec.of(fmt)
    q13, q2, s13, s2 = moekit.quantize_experts(w1, w2, fmt)
    limit = 7.0 if m.act == "swigluoai" else None
    run = lambda x, w, ids, c: tq.fused_experts_quant_impl(  # noqa: E731
        x, q13, q2, w, ids, spec, s13, s2, None, None, m.act, False, b1, b2, None, limit, config=copy.deepcopy(c))
    px, pw, pids = tb._routing(tb.PROBES, m.H, e, k, seed=1)
    alone = torch.cat([run(px[i:i + 1], pw[i:i + 1], pids[i:i + 1], table[1]) for i in range(tb.PROBES)])
    for t in (64, 1024):
        x, w, ids = tb._routing(t, m.H, e, k, seed=t)
        pos = torch.randperm(t, generator=torch.Generator().manual_seed(t))[:tb.PROBES].cuda()
        x[pos], w[pos], ids[pos] = px, pw, pids
        outs = {}
        for label, c in (("rega64", cfg(64, True)), ("triton64", cfg(64, False, gluon=False)),
                         ("rega16", cfg(16, True)), ("triton16", cfg(16, False, gluon=False)),
                         ("smem64", cfg(64, False)), ("rega32", cfg(32, True)), ("triton32", cfg(32, False, False))):
            try:
                outs[label] = run(x, w, ids, c)
            except Exception as ex:  # noqa: BLE001
                print(name, key, t, label, "ERROR", str(ex)[:200], flush=True)
                continue
            o = outs[label][pos]
            same = [bool(torch.equal(o[i], alone[i])) for i in range(tb.PROBES)]
            print(f"{name} {key} T={t} {label:9s} probes alone-equal {same} max|d| {(o.float() - alone.float()).abs().max().item():.3e}",
                  flush=True)
        ref = outs.get("triton64")
        for label, o in outs.items():
            if ref is not None:
                d = (o.float() - ref.float()).abs()
                print(f"   {label:9s} vs triton64: equal {bool(torch.equal(o, ref))} rows differing {int((d.amax(1) > 0).sum())}",
                      flush=True)
