"""GFLOP/s of the model's matrix-product shapes in PyTorch on one thread (a @ b, output allocated
per call, as eager PyTorch does), best of 3 rounds of ~2 GFLOP each. Same shapes as src/main.rs."""
import time
import torch

torch.set_num_threads(1)
SHAPES = [(5316, 64, 64, False, False), (5316, 64, 256, False, False), (5316, 256, 64, False, False),
          (64, 5316, 64, True, False), (1024, 64, 4926, False, True), (49260, 768, 64, False, False),
          (768, 49260, 64, True, False), (1024, 1024, 1024, False, False)]
print("shape\tPyTorch")
for m, k, n, ta, tb in SHAPES:
    a = torch.rand(k, m).t() if ta else torch.rand(m, k)
    b = torch.rand(n, k).t() if tb else torch.rand(k, n)
    flop = 2 * m * n * k
    reps, best = max(3, int(2e9 / flop)), float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, (time.perf_counter() - t) / reps)
    print(f"{m}x{k}x{n}\t{flop / best / 1e9:.1f}")
