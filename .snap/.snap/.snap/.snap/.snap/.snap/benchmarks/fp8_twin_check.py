import torch, moekit
from moekit.ops.experts_quant import fused_experts_quant_torch
torch.manual_seed(0)
E,H,I,K,T = 16,7168,2048,8,64
fmt = {"quant_method":"fp8","fmt":"e4m3","activation_scheme":"dynamic","weight_block_size":[128,128]}
w13 = torch.randn(E,2*I,H)*H**-0.5; w2 = torch.randn(E,H,I)*I**-0.5
q13,q2,s13,s2 = moekit.quantize_experts(w13,w2,fmt)
x = torch.randn(T,H).bfloat16(); logits = torch.randn(T,E)
w, ids = torch.topk(torch.softmax(logits,-1),K); ids=ids.int()
cpu = fused_experts_quant_torch(x,q13,q2,w,ids,fmt=fmt,w13_scale=s13,w2_scale=s2).float()
d = lambda t: t.cuda()
gpu = fused_experts_quant_torch(d(x),d(q13),d(q2),d(w),d(ids),fmt=fmt,w13_scale=d(s13),w2_scale=d(s2)).float().cpu()
from moekit.ops.triton_experts_quant import fused_experts_quant_triton
tri = fused_experts_quant_triton(d(x),d(q13),d(q2),d(w),d(ids),fmt=moekit.parse_quant_config(fmt),w13_scale=d(s13),w2_scale=d(s2)).float().cpu()
rel = lambda a,b: ((a-b).norm()/b.norm()).item()
print("tf32 matmul allowed:", torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
print(f"twin cuda vs cpu {rel(gpu,cpu):.3e}  triton vs cpu twin {rel(tri,cpu):.3e}  triton vs cuda twin {rel(tri,gpu):.3e}")

# where the CUDA twin departs from the CPU twin, stage by stage (one expert's rows)
from moekit.ops._quant_rules import quantize_fp8_activations, fp8_block_dequantize  # noqa: E402

xq_c, xs_c = quantize_fp8_activations(x, 128)
xq_g, xs_g = quantize_fp8_activations(d(x), 128)
print("activation quantiser: scales equal", torch.equal(xs_c, xs_g.cpu()), " codes equal",
      torch.equal(xq_c.view(torch.uint8), xq_g.cpu().view(torch.uint8)),
      " codes differing:", (xq_c.view(torch.uint8) != xq_g.cpu().view(torch.uint8)).sum().item())
v = torch.randn(4096) * 3
print("e4m3 cast of the same fp32 values equal on both:",
      torch.equal(v.to(torch.float8_e4m3fn).view(torch.uint8), d(v).to(torch.float8_e4m3fn).cpu().view(torch.uint8)))
w1 = fp8_block_dequantize(q13[0], s13[0], 128, 128)
xd = xq_c.float() * xs_c.repeat_interleave(128, 1)[:, :H]
h_c = xd @ w1.t()
h_g = (d(xd) @ d(w1).t()).cpu()
print(f"fp32 GEMM x_deq @ W1_deq^T: cuda vs cpu rel {rel(h_g, h_c):.3e}; equal {torch.equal(h_g, h_c)}")
