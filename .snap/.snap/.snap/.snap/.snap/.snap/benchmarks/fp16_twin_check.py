"""fp16 activations, weight-only 4-bit experts: the torch twin against the Triton kernels on a GPU (round 57: the twin
now rounds the dequantised weight to float16 as the kernels' operand; before, int4 sat ~4e-4 relative RMS away).

    PYTHONPATH=src python benchmarks/fp16_twin_check.py
"""

import torch

import moekit
from moekit.benchmarking.bench_quant import QUANT_FORMATS
from moekit.benchmarking.tune_checks import rel_rms


def main() -> None:
    torch.manual_seed(0)
    dev = "cuda"
    for name in ("int4", "mxfp4", "fp8"):
        for e, k, h, i, t in ((16, 4, 2048, 768, 64), (8, 2, 4096, 1024, 300)):
            w13 = torch.randn(e, 2 * i, h, device=dev) * h**-0.5
            w2 = torch.randn(e, h, i, device=dev) * i**-0.5
            q = moekit.quantize_experts(w13, w2, QUANT_FORMATS[name])
            x = torch.randn(t, h, device=dev).half()
            logits = torch.randn(t, e, device=dev)
            out = {}
            for backend in ("torch", "triton"):
                layer = moekit.FusedMoE(e, k, h, i, params_dtype=torch.float16, backend=backend, device=dev,
                                        quant_config=QUANT_FORMATS[name]).eval()
                layer.load_expert_weights(q[0], q[1], w13_scale=q[2], w2_scale=q[3])
                with torch.no_grad():
                    out[backend] = layer(x, logits).float()
            rel = rel_rms(out["triton"], out["torch"])
            print(f"{name:6s} E={e} K={k} H={h} I={i} T={t}: twin vs Triton relative RMS {rel:.2e}")


if __name__ == "__main__":
    main()
