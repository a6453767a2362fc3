"""SPEC §9 batch invariance on a GPU: a token's output is bit-identical alone (T = 1) and inside a
batch of every token bucket, for the configs a lookup gives on this device (tuned file, else the
heuristic) and for every config file shipped with moekit (run as explicit configs on this GPU).

Shapes: the benchmark registry's H, I, K, activation and biases; at most 32 experts (invariance is per
token: the expert count only changes which rows share a block). The first test also runs whole layers.
"""

import json

import pytest
import torch

import moekit
from moekit.benchmarking import EXTRA_MODELS, MODELS, TOKENS
from moekit.ops import triton_configs as tc
from moekit.ops import triton_experts_quant as tq
from moekit.ops.w4_layout import rega_layout_ok, relay_rega
from moekit.ops.formats import Fp8BlockFormat, Int4GroupFormat, Mxfp4Format
from moekit.ops.triton_experts import fused_experts_impl

pytestmark = pytest.mark.gpu
DT = torch.bfloat16
#: every shape whose shipped tables these tests run: the benchmark shapes and the extra tuned ones
SHIPPED = {**MODELS, **EXTRA_MODELS}
PROBES = 4


def _device_table(m) -> dict:
    """{bucket: config} a lookup gives on this GPU for the real shape: the deciding file's, else heuristic."""
    name = torch.cuda.get_device_name()
    _, table = tc.shape_table(name, tc.shape_key(m.E, m.H, m.I, m.K, DT, m.gated))
    if table:
        return {int(b): c for b, c in table.items()}
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return {t: tc.heuristic_config(t, m.E, m.H, m.I, m.K, DT, sms) for t in TOKENS}


def _shipped_tables():
    for path in sorted(tc.CONFIG_DIR.glob("*.json")):
        entries = json.loads(path.read_text())["entries"]
        for m in SHIPPED.values():
            table = entries.get(tc.shape_key(m.E, m.H, m.I, m.K, DT, m.gated))
            if table:
                yield pytest.param(m.name, path.stem, {int(b): c for b, c in table.items()},
                                   id=f"{path.stem}-{m.name}")


def _problem(m, experts, dt=DT):
    g = torch.Generator(device="cuda").manual_seed(0)
    e = min(m.E, experts)
    rows = 2 * m.I if m.gated else m.I
    w1 = torch.randn(e, rows, m.H, device="cuda", dtype=dt, generator=g) * m.H**-0.5
    w2 = torch.randn(e, m.H, m.I, device="cuda", dtype=dt, generator=g) * m.I**-0.5
    b1 = torch.randn(e, rows, device="cuda", dtype=dt, generator=g) * 0.05 if m.has_bias else None
    b2 = torch.randn(e, m.H, device="cuda", dtype=dt, generator=g) * 0.05 if m.has_bias else None
    return e, w1, w2, b1, b2


def _routing(t, h, e, k, seed, dt=DT):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(t, h, device="cuda", dtype=dt, generator=g)
    w, ids = torch.softmax(torch.randn(t, e, device="cuda", generator=g), -1).topk(k, dim=-1)
    return x, (w / w.sum(-1, keepdim=True)).contiguous(), ids.int().contiguous()


def _check_rows(m, table, experts=32, fmt=None, dt=DT):
    """Probe rows alone (the smallest bucket's config: T = 1) against the same rows at random places in
    a batch of every bucket's size (that bucket's config). ``fmt``: the weights quantised to it; ``dt``: the
    activations' and unquantised weights' dtype."""
    e, w1, w2, b1, b2 = _problem(m, experts, dt)
    k = min(m.K, e)
    run = lambda x, w, ids, cfg: fused_experts_impl(x, w1, w2, w, ids, m.act, False, b1, b2, None, None,  # noqa
                                                    config=cfg)
    if fmt is not None:  # the words packed as a Triton-backend layer stores them (re-laid where it would)
        relaid = rega_layout_ok(fmt, DT, m.H, m.I)
        spec = tq.QuantSpec.of(fmt, relaid=relaid)
        q13, q2, s13, s2 = moekit.quantize_experts(w1, w2, fmt)
        if relaid:
            q13, q2 = relay_rega(q13), relay_rega(q2)
        limit = 7.0 if m.act == "swigluoai" else None
        run = lambda x, w, ids, cfg: tq.fused_experts_quant_impl(  # noqa: E731
            x, q13, q2, w, ids, spec, s13, s2, None, None, m.act, False, b1, b2, None, limit, config=cfg)
    px, pw, pids = _routing(PROBES, m.H, e, k, seed=1, dt=dt)
    alone = [run(px[i : i + 1], pw[i : i + 1], pids[i : i + 1], table[min(table)]) for i in range(PROBES)]
    for bucket, cfg in sorted(table.items()):
        x, w, ids = _routing(bucket, m.H, e, k, seed=bucket, dt=dt)
        n = min(PROBES, bucket)
        pos = torch.randperm(bucket, generator=torch.Generator().manual_seed(bucket))[:n].cuda()
        x[pos], w[pos], ids[pos] = px[:n], pw[:n], pids[:n]
        out = run(x, w, ids, cfg)
        for i in range(n):
            assert torch.equal(out[pos[i]], alone[i][0]), (m.name, bucket, cfg, i)


@pytest.mark.parametrize("dt", [torch.float16, torch.float32])
@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "mixtral-8x7b"])
def test_rows_alone_and_in_batches_fp16_fp32_heuristic(name, dt):
    """fp16 / fp32 untuned configs: BLOCK_K follows BLOCK_M there too (fp16 128 / 64, fp32 64 / 32). Round 62's audit
    found rows alone and in batches differ under the interpreter (numpy's dot sums each BLOCK_K step apart); this
    checks the GPU, whose MMA / FMA chains take K in order (the claim of :mod:`moekit.ops.config_heuristic`)."""
    m = MODELS[name]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    table = {t: tc.heuristic_config(t, m.E, m.H, m.I, m.K, dt, sms) for t in TOKENS}
    assert len({c["w13"]["BK"] for c in table.values()}) == 2
    _check_rows(m, table, dt=dt)


@pytest.mark.parametrize("name", list(MODELS))
def test_rows_alone_and_in_batches_device_configs(name):
    m = MODELS[name]
    _check_rows(m, _device_table(m))


@pytest.mark.parametrize("name, device, table", list(_shipped_tables()))
def test_rows_alone_and_in_batches_shipped_configs(name, device, table):
    _check_rows(SHIPPED[name], table)


def _shipped_fp8_tables():
    fmt = Fp8BlockFormat(128, 128)
    for path in sorted(tc.CONFIG_DIR.glob("*.json")):
        entries = json.loads(path.read_text())["entries"]
        for m in SHIPPED.values():
            table = entries.get(tc.shape_key(m.E, m.H, m.I, m.K, DT, m.gated, tq.QuantSpec.of(fmt).key))
            if table:
                yield pytest.param(m.name, path.stem, {int(b): c for b, c in table.items()},
                                   id=f"{path.stem}-{m.name}-fp8")


@pytest.mark.parametrize("name, device, table", list(_shipped_fp8_tables()))
def test_rows_alone_and_in_batches_shipped_fp8_configs(name, device, table):
    """The shipped fp8 block tables: swapped decode buckets beside unswapped larger ones."""
    _check_rows(SHIPPED[name], table, fmt=Fp8BlockFormat(128, 128))


def _shipped_4bit_tables():
    for fmt in (Mxfp4Format(), Int4GroupFormat(32)):
        key = tq.QuantSpec.of(fmt).key
        for path in sorted(tc.CONFIG_DIR.glob("*.json")):
            entries = json.loads(path.read_text())["entries"]
            for m in SHIPPED.values():
                table = entries.get(tc.shape_key(m.E, m.H, m.I, m.K, DT, m.gated, key))
                if table:
                    yield pytest.param(m.name, fmt, {int(b): c for b, c in table.items()},
                                       id=f"{path.stem}-{m.name}-{key}")


@pytest.mark.parametrize("name, fmt, table", list(_shipped_4bit_tables()))
def test_rows_alone_and_in_batches_shipped_4bit_configs(name, fmt, table):
    """The shipped mxfp4 / int4 tables: swapped decode buckets (some with w13_split), unswapped ones and the
    swapped BLOCK_M 128 tile of DeepSeek-V3 mxfp4 T = 4096."""
    _check_rows(SHIPPED[name], table, fmt=fmt)


def test_whole_layer_rows_alone_and_in_batches():
    """Routing + experts through the layer's own lookup (and its internal graphs for T <= 8)."""
    m = MODELS["qwen3-30b-a3b"]
    layer = moekit.FusedMoE(m.E, m.K, m.H, m.I, params_dtype=DT, device="cuda", backend="triton",
                            **m.layer_kwargs())
    re = layer.routed_experts
    with torch.no_grad():
        re.w13_weight.normal_(0, m.H**-0.5)
        re.w2_weight.normal_(0, m.I**-0.5)
    layer.load_expert_weights(re.w13_weight, re.w2_weight)
    g = torch.Generator(device="cuda").manual_seed(2)
    px = torch.randn(PROBES, m.H, device="cuda", dtype=DT, generator=g)
    plg = torch.randn(PROBES, m.E, device="cuda", generator=g)
    alone = [layer(px[i : i + 1], plg[i : i + 1]) for i in range(PROBES)]
    for t in (2, 3, 5, 8, 16, 64, 256, 1024, 4096, 16384):
        x = torch.randn(t, m.H, device="cuda", dtype=DT, generator=g)
        lg = torch.randn(t, m.E, device="cuda", generator=g)
        n = min(PROBES, t)
        x[-n:], lg[-n:] = px[:n], plg[:n]
        out = layer(x, lg)
        for i in range(n):
            assert torch.equal(out[t - n + i], alone[i][0]), (t, i)


@pytest.mark.parametrize("name", ["deepseek-v3", "qwen3-30b-a3b", "mixtral-8x7b"])
def test_rows_alone_and_in_batches_bf16_heuristic(name):
    """The untuned bf16 configs of this GPU, as a shape without a table gets them: BLOCK_K 128 at the decode tiles and
    64 above (:mod:`moekit.ops.config_heuristic`), so this checks that the accumulation order does not follow
    BLOCK_K (round 48's audit: SPEC §9 asks one BLOCK_K per shape)."""
    m = MODELS[name]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    table = {t: tc.heuristic_config(t, m.E, m.H, m.I, m.K, DT, sms) for t in TOKENS}
    assert len({c["w13"]["BK"] for c in table.values()}) == 2  # the two BLOCK_Ks the docstring names
    _check_rows(m, table)


@pytest.mark.parametrize("name", ["deepseek-v3", "gpt-oss-120b", "mixtral-8x7b"])
@pytest.mark.parametrize("fmt", [Mxfp4Format(), Int4GroupFormat(32)], ids=["mxfp4", "int4"])
def test_rows_alone_and_in_batches_4bit_heuristic(name, fmt):
    """The untuned mxfp4 / int4 configs of this GPU (on sm_90 the register-operand Gluon GEMMs of round 36, swapped
    up to 96 rows per expert, w2 unswapped on Triton above), as a shape without a table gets them: gpt-oss's partial
    K step, Mixtral's few experts."""
    m = MODELS[name]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cap = tc.heuristic_capability(torch.cuda.get_device_properties(0))  # as the runtime lookup keys on it
    key = tq.QuantSpec.of(fmt).key
    _check_rows(m, {t: tc.heuristic_config(t, m.E, m.H, m.I, m.K, DT, sms, key, cap) for t in TOKENS}, fmt=fmt)


@pytest.mark.parametrize("name", ["deepseek-v3", "qwen3-30b-a3b", "mixtral-8x7b"])
def test_rows_alone_and_in_batches_fp8_heuristic(name):
    """The untuned fp8 block configs of this GPU (on sm_90 the Gluon decode GEMMs with PDL of round 37 up to 2 rows per
    expert, the Triton / Gluon tiles above), as a shape without a table gets them."""
    m = MODELS[name]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cap = tc.heuristic_capability(torch.cuda.get_device_properties(0))  # as the runtime lookup keys on it
    fmt = Fp8BlockFormat(128, 128)
    key = tq.QuantSpec.of(fmt).key
    _check_rows(m, {t: tc.heuristic_config(t, m.E, m.H, m.I, m.K, DT, sms, key, cap) for t in TOKENS}, fmt=fmt)
