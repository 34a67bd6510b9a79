import os, torch, time
import triton_kstconv as K
from torch.profiler import profile, ProfilerActivity
x = torch.randn(64, 256, 8, 8, device="cuda", requires_grad=True)
m = K.ConvTranspose2d(256, 128, 4, 2, 1).cuda()
for _ in range(3):
    m(x).sum().backward()
torch.cuda.synchronize()
t=time.perf_counter()
for _ in range(20): y = m(x)
torch.cuda.synchronize(); print("fwd wall ms", (time.perf_counter()-t)/20*1e3)
t=time.perf_counter()
for _ in range(20): m(x).sum().backward()
torch.cuda.synchronize(); print("fwdbwd wall ms", (time.perf_counter()-t)/20*1e3)
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
    for _ in range(5): m(x).sum().backward()
    torch.cuda.synchronize()
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
print(p.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
