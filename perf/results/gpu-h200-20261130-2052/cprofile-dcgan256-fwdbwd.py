import cProfile, pstats, torch
import triton_kstconv as K
x = torch.randn(64, 256, 8, 8, device="cuda", requires_grad=True)
m = K.ConvTranspose2d(256, 128, 4, 2, 1).cuda()
for _ in range(3): m(x).sum().backward()
torch.cuda.synchronize()
pr = cProfile.Profile(); pr.enable()
for _ in range(50): m(x).sum().backward()
torch.cuda.synchronize(); pr.disable()
s = pstats.Stats(pr); s.sort_stats("tottime").print_stats(30); s.sort_stats("cumtime").print_stats(40)
