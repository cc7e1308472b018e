import sys, torch, time
sys.path.insert(0, "benchmarks")
import qat_kd_perf as b
import triton.testing
from rqat_sdk.ops.fake_quant import fake_quantize_weight, _WeightFakeQuant, int_range
from rqat_sdk.modifiers.qat.layers import attach_fake_quant

for dt in (torch.bfloat16, torch.float32):
    w = (torch.randn(3072, 1024, device="cuda") * 0.02).to(dt).requires_grad_(True)
    scale = torch.full((3072, 8), 0.01, device="cuda", dtype=torch.bfloat16)
    zero = torch.zeros((3072, 8), device="cuda", dtype=torch.int8)
    grad = torch.randn(3072, 1024, device="cuda", dtype=torch.bfloat16)
    fwd = lambda: fake_quantize_weight(w, scale, zero, 3, 128, dtype=torch.bfloat16)
    fb = lambda: fake_quantize_weight(w, scale, zero, 3, 128, dtype=torch.bfloat16).backward(grad)
    for name, fn in (("fwd", fwd), ("fwd+bwd", fb)):
        print(dt, name, "do_bench %.4f ms" % triton.testing.do_bench(fn), "cudagraph %.4f ms" % triton.testing.do_bench_cudagraph(fn) if name == "fwd" else "")
    # CPU-side time per call
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(200): fwd()
    cpu = (time.perf_counter() - t) / 200 * 1e3
    torch.cuda.synchronize()
    print(dt, "cpu-side per fwd call %.4f ms" % cpu)

ids = b.synthetic_batch(4, 2048, b.QWEN3_0_6B["vocab_size"]).cuda()
model = b.fresh_model()
model = b.quantize_w3g128(model)
attach_fake_quant(model, dtype=torch.bfloat16, learn_scales=False, learn_clipping=False)
trainer, step = b.rqat_trainer(model, None, ids, "sft")
for _ in range(3): step()
torch.cuda.synchronize()
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(2): step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60))
