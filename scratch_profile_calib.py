import cProfile, pstats, io, time, torch, moeq, os
from triton.testing import do_bench
from moeq.integrations.hf import tiny_model
from moeq.runtime import kernels
OUT=os.environ.get("OUT","out")
size=dict(hidden_size=512, moe_intermediate_size=256, num_experts=32)
tokens = torch.randint(0, 256, (8, 256), device="cuda")
plain = tiny_model("qwen3_moe", torch.bfloat16, **size).cuda(); plain.set_experts_implementation("grouped_mm")
pc = torch.compile(plain)
model = moeq.prepare(tiny_model("qwen3_moe", torch.bfloat16, **size).cuda(), moeq.NVFP4)
mc = torch.compile(model, backend="moeq")
def wall(f, n=200):
    for _ in range(10): f()
    torch.cuda.synchronize(); t=time.perf_counter()
    for _ in range(n): f()
    torch.cuda.synchronize(); return (time.perf_counter()-t)/n*1e3
with torch.no_grad():
    print("plain do_bench", do_bench(lambda: pc(tokens), return_mode="median"), "wall/call ms", wall(lambda: pc(tokens)))
    with moeq.calibrate(mc):
        print("calib do_bench", do_bench(lambda: mc(tokens), return_mode="median"), "wall/call ms", wall(lambda: mc(tokens)))
        pr = cProfile.Profile(); pr.enable()
        for _ in range(100): mc(tokens)
        torch.cuda.synchronize(); pr.disable()
        s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30); print(s.getvalue()[:6000])
        s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(40); print(s.getvalue()[:8000])
    pr = cProfile.Profile(); pr.enable()
    for _ in range(100): pc(tokens)
    torch.cuda.synchronize(); pr.disable()
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(15); print("PLAIN", s.getvalue()[:3000])
    x = torch.randn(2048*8, 512, device="cuda", dtype=torch.bfloat16)
    offs = torch.arange(1, 33, device="cuda", dtype=torch.int32) * 512
    a = torch.zeros(32, device="cuda"); c = torch.zeros(32, dtype=torch.int64, device="cuda")
    print("op call wall us", wall(lambda: torch.ops.moeq.observe_segments_.default(x, offs, a, c, 0, -1), 2000)*1e3)
    print("segment_amax_ wall us", wall(lambda: kernels.segment_amax_(x, offs, a, c), 2000)*1e3)
