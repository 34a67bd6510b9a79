"""The paper's experiments (Tida et al., arXiv 2209.03704), reproduced with data that ships with
the code, each with PyTorch's own op and zero insertion side by side:

    python -m perf.paper digits     # (a) a one-transposed-convolution model trained on digits
    python -m perf.paper upsample   # (b) an image-upsampling workload (stand-in for flowers)
    python -m perf.paper dcgan      # (c) a DCGAN generator trained a few steps, convert() vs stock
    python -m perf.paper all

(a) uses scikit-learn's bundled handwritten digits, resized to MNIST's 28 x 28 (``--mnist
PATH`` takes an MNIST ``train-images-idx3-ubyte`` file, with its labels file beside it);
(b) crops of scikit-learn's bundled ``flower.jpg``. Each prints a table and writes JSON and a PNG
under perf/results/. CPU by default (the paper's 2.2x training result was on a dual-core CPU).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gzip
import json
import os
import statistics
import struct
import time

import torch
import torch.nn.functional as F
from torch import nn

import triton_kstconv as K
from perf.models import DCGANGenerator  # pytorch/examples' generator, 1x1 -> 64x64

RESULTS = os.path.join(os.path.dirname(__file__), "results")


class ZeroInsertionConvTranspose2d(nn.ConvTranspose2d):
    """nn.ConvTranspose2d computed the conventional way (the paper's baseline)."""

    def forward(self, x, output_size=None):
        return K.conv_transpose_zero_insertion(x, self.weight, self.bias, self.stride,
                                               self.padding, self.output_padding, self.groups,
                                               self.dilation)


VARIANTS = {"ours": K.ConvTranspose2d, "native": nn.ConvTranspose2d,
            "zero_insertion": ZeroInsertionConvTranspose2d}


def _swap_conv_transpose(model: nn.Module, cls) -> nn.Module:
    """A copy of `model` whose ConvTranspose2d layers are `cls`, with the same parameters."""
    model = copy.deepcopy(model)
    for name, child in list(model.named_children()):
        if isinstance(child, nn.ConvTranspose2d):
            new = cls.__new__(cls)
            new.__dict__.update(child.__dict__)
            if cls is K.ConvTranspose2d:
                new.activation, new.backend = None, None
            setattr(model, name, new)
        else:
            setattr(model, name, _swap_conv_transpose(child, cls))
    return model


def _stamp():
    return datetime.datetime.now().strftime("%Y%m%d-%H%M")


def _save(name, payload, fig=None):
    os.makedirs(RESULTS, exist_ok=True)
    prefix = os.path.join(RESULTS, f"paper-{name}-cpu-{_stamp()}")
    payload["meta"] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                       "date": datetime.datetime.now().isoformat(timespec="seconds")}
    with open(prefix + ".json", "w") as f:
        json.dump(payload, f, indent=1)
    if fig is not None:
        fig.savefig(prefix + ".png", dpi=110)
    print(f"# wrote {prefix}.json" + (" / .png" if fig is not None else ""))
    return prefix


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# --------------------------------------------------------------------------------- (a) digits
def _read_idx(path: str) -> torch.Tensor:
    """An IDX file (MNIST's format; .gz accepted) as a uint8 tensor."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    nd = data[3]
    shape = struct.unpack(">" + "I" * nd, data[4:4 + 4 * nd])
    return torch.frombuffer(bytearray(data[4 + 4 * nd:]), dtype=torch.uint8).reshape(shape)


def load_digits_28(mnist_path: str | None = None):
    """(images [n, 1, 28, 28] in [0, 1], labels): MNIST from IDX files if given, else
    scikit-learn's bundled 8 x 8 digits resized to 28 x 28."""
    if mnist_path:
        images = _read_idx(mnist_path).float().div(255).unsqueeze(1)
        labels = _read_idx(mnist_path.replace("images-idx3", "labels-idx1")).long()
        return images, labels
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    return x, torch.tensor(d.target)


class OneLayerNet(nn.Module):
    """A feature convolution, ONE transposed convolution (28 -> 56, the layer under test), and a
    pooled linear classifier."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Conv2d(1, width, 3, padding=1)
        self.up = nn.ConvTranspose2d(width, width, 4, stride=2, padding=1)
        self.head = nn.Linear(width * 7 * 7, 10)

    def forward(self, x):
        y = F.relu(self.up(F.relu(self.features(x))))
        return self.head(F.adaptive_avg_pool2d(y, 7).flatten(1))


def run_digits(epochs: int = 4, batch: int = 64, mnist: str | None = None, width: int = 32):
    torch.manual_seed(0)
    x, y = load_digits_28(mnist)
    n_test = max(1, len(x) // 6)
    xt, yt, xs, ys = x[:n_test], y[:n_test], x[n_test:], y[n_test:]
    base = OneLayerNet(width)
    names = list(VARIANTS)
    state = {}
    for name in names:
        model = _swap_conv_transpose(base, VARIANTS[name])
        state[name] = dict(model=model, opt=torch.optim.SGD(model.parameters(), lr=0.05,
                                                            momentum=0.9),
                           gen=torch.Generator().manual_seed(1), losses=[], epoch_s=[])
    # the variants train in lockstep, one epoch each in turn (order rotated every epoch), so
    # that machine noise falls on all of them alike; each sees the same batches
    for epoch in range(epochs):
        order = names[epoch % len(names):] + names[:epoch % len(names)]
        for name in order:
            st = state[name]
            perm = torch.randperm(len(xs), generator=st["gen"])
            start = time.perf_counter()
            for i in range(0, len(xs) - batch + 1, batch):
                idx = perm[i:i + batch]
                st["opt"].zero_grad()
                loss = F.cross_entropy(st["model"](xs[idx]), ys[idx])
                loss.backward()
                st["opt"].step()
                st["losses"].append(loss.item())
            st["epoch_s"].append(time.perf_counter() - start)
    results = {}
    for name in names:
        st = state[name]
        with torch.no_grad():
            acc = (st["model"](xt).argmax(1) == yt).float().mean().item()
        results[name] = {"epoch_s": st["epoch_s"],
                         "median_epoch_s": statistics.median(st["epoch_s"][1:] or st["epoch_s"]),
                         "losses": st["losses"], "test_accuracy": acc}
    ours = results["ours"]["median_epoch_s"]
    print(f"\n(a) one transposed-convolution layer ({width}->{width}, k4 s2 p1, 28->56), "
          f"{'MNIST' if mnist else 'scikit-learn digits resized to 28x28'}, batch {batch}, "
          f"{epochs} epochs, {torch.get_num_threads()} threads")
    print("| implementation | s / epoch (median) | ours faster by | final loss | test accuracy |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['median_epoch_s']:.3f} | {r['median_epoch_s'] / ours:.2f}x | "
              f"{r['losses'][-1]:.4f} | {r['test_accuracy']:.3f} |")
    diff = max(abs(a - b) for a, b in zip(results["ours"]["losses"], results["native"]["losses"]))
    print(f"max |loss(ours) - loss(native)| over all steps: {diff:.2e}")
    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.6))
    for name, r in results.items():
        ax[0].plot(r["losses"], label=name, lw=1)
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("cross-entropy")
    ax[0].set_title("(a) training loss: curves coincide")
    ax[0].legend()
    names = list(results)
    ax[1].bar(names, [results[n]["median_epoch_s"] for n in names], color=["C0", "C1", "C2"])
    ax[1].set_ylabel("seconds per epoch")
    ax[1].set_title("time per epoch")
    fig.tight_layout()
    _save("digits", {"results": results, "max_loss_diff_vs_native": diff, "width": width,
                     "batch": batch, "epochs": epochs}, fig)
    return results


# ------------------------------------------------------------------------------ (b) upsample
def flower_crops(n: int = 16, size: int = 64, seed: int = 0):
    from sklearn.datasets import load_sample_image
    img = torch.tensor(load_sample_image("flower.jpg"), dtype=torch.float32).permute(2, 0, 1)
    img = img / 255.0
    g = torch.Generator().manual_seed(seed)
    hs = torch.randint(0, img.shape[1] - size, (n,), generator=g)
    ws = torch.randint(0, img.shape[2] - size, (n,), generator=g)
    return torch.stack([img[:, h:h + size, w:w + size] for h, w in zip(hs, ws)])


class Upsampler(nn.Module):
    """4x upsampling decoder: 3 -> 64 -> 32 -> 3 channels, two stride-2 transposed convs."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 64, 3, padding=1)
        self.up1 = nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(32, 3, 4, stride=2, padding=1)

    def forward(self, x):
        return torch.sigmoid(self.up2(F.relu(self.up1(F.relu(self.head(x))))))


def run_upsample(batches: int = 10, crop: int = 64, steps: int = 30):
    torch.manual_seed(0)
    hi = flower_crops(16, crop * 4)
    lo = F.avg_pool2d(hi, 4)
    base = Upsampler()
    # train briefly (ours) so that the output is an image, then time inference for all three
    trained = _swap_conv_transpose(base, K.ConvTranspose2d)
    opt = torch.optim.Adam(trained.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(trained(lo), hi)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    results, outs = {}, {}
    for name, cls in VARIANTS.items():
        model = _swap_conv_transpose(trained, cls).eval()
        with torch.no_grad():
            model(lo)
            times = []
            for _ in range(batches):
                start = time.perf_counter()
                outs[name] = model(lo)
                times.append(time.perf_counter() - start)
        results[name] = {"median_ms": 1e3 * statistics.median(times)}
    ours = results["ours"]["median_ms"]
    for name in results:
        results[name]["max_abs_diff_vs_native"] = (outs[name] - outs["native"]).abs().max().item()
    print(f"\n(b) image upsampling (flower.jpg crops, 16 x {crop}x{crop} -> {4 * crop}x{4 * crop}),"
          f" inference, {torch.get_num_threads()} threads")
    print("| implementation | ms / batch (median) | ours faster by | max |out - native| |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['median_ms']:.2f} | {r['median_ms'] / ours:.2f}x | "
              f"{r['max_abs_diff_vs_native']:.1e} |")
    plt = _plt()
    fig, ax = plt.subplots(1, 4, figsize=(13, 3.4))
    ax[0].imshow(lo[0].permute(1, 2, 0).clamp(0, 1))
    ax[0].set_title(f"input {crop}x{crop}")
    ax[1].imshow(outs["ours"][0].permute(1, 2, 0).clamp(0, 1))
    ax[1].set_title(f"ours, {4 * crop}x{4 * crop}")
    ax[2].imshow(hi[0].permute(1, 2, 0))
    ax[2].set_title("original")
    names = list(results)
    ax[3].bar(names, [results[n]["median_ms"] for n in names], color=["C0", "C1", "C2"])
    ax[3].set_ylabel("ms per batch")
    for a in ax[:3]:
        a.axis("off")
    fig.tight_layout()
    _save("upsample", {"results": results, "train_losses": losses, "crop": crop}, fig)
    return results


# --------------------------------------------------------------------------------- (c) dcgan
class Discriminator(nn.Module):
    def __init__(self, ndf=64, nc=3):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * 4, 1, 8, 1, 0, bias=False))

    def forward(self, x):
        return self.main(x).flatten()


def run_dcgan(steps: int = 6, batch: int = 16):
    torch.manual_seed(0)
    real_pool = flower_crops(64, 64, seed=1) * 2 - 1
    gen0, disc0 = DCGANGenerator(), Discriminator()
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(steps, batch, 100, 1, 1, generator=g)
    picks = torch.randint(0, len(real_pool), (steps, batch), generator=g)
    results = {}
    for name in ("stock", "converted"):
        gen, disc = copy.deepcopy(gen0), copy.deepcopy(disc0)
        if name == "converted":
            K.convert(gen)
        opt_g = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
        lg, ld, step_s = [], [], []
        for s in range(steps):
            start = time.perf_counter()
            real = real_pool[picks[s]]
            fake = gen(noise[s])
            opt_d.zero_grad()
            loss_d = F.binary_cross_entropy_with_logits(disc(real), torch.ones(batch)) + \
                F.binary_cross_entropy_with_logits(disc(fake.detach()), torch.zeros(batch))
            loss_d.backward()
            opt_d.step()
            opt_g.zero_grad()
            loss_g = F.binary_cross_entropy_with_logits(disc(fake), torch.ones(batch))
            loss_g.backward()
            opt_g.step()
            step_s.append(time.perf_counter() - start)
            lg.append(loss_g.item())
            ld.append(loss_d.item())
        results[name] = {"loss_g": lg, "loss_d": ld, "step_s": step_s,
                         "median_step_s": statistics.median(step_s[1:] or step_s)}
    dg = max(abs(a - b) for a, b in zip(results["stock"]["loss_g"], results["converted"]["loss_g"]))
    dd = max(abs(a - b) for a, b in zip(results["stock"]["loss_d"], results["converted"]["loss_d"]))
    print(f"\n(c) DCGAN (pytorch/examples, 64x64), {steps} steps of batch {batch} on flower crops, "
          f"{torch.get_num_threads()} threads")
    print("| model | s / step (median) | final loss G | final loss D |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['median_step_s']:.3f} | {r['loss_g'][-1]:.4f} | "
              f"{r['loss_d'][-1]:.4f} |")
    print(f"max |loss difference| over the steps: G {dg:.2e}, D {dd:.2e}")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for name, r in results.items():
        ax.plot(r["loss_g"], label=f"G {name}", ls="-" if name == "stock" else "--")
        ax.plot(r["loss_d"], label=f"D {name}", ls="-" if name == "stock" else "--")
    ax.set_xlabel("step")
    ax.set_title("(c) DCGAN losses: stock vs convert(model)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save("dcgan", {"results": results, "max_loss_diff": {"G": dg, "D": dd}}, fig)
    return results, dg, dd


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("experiment", choices=["digits", "upsample", "dcgan", "all"])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--mnist", default=None, help="path to MNIST train-images-idx3-ubyte[.gz]")
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args(argv)
    if args.experiment in ("digits", "all"):
        run_digits(args.epochs, mnist=args.mnist)
    if args.experiment in ("upsample", "all"):
        run_upsample()
    if args.experiment in ("dcgan", "all"):
        run_dcgan(args.steps)


if __name__ == "__main__":
    main()
