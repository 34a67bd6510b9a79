"""Real models end to end (perf/models.py): stock PyTorch vs ``convert()`` vs
``convert(fuse=True)``, inference (eval, no_grad) and a training step (forward, backward, SGD),
measured side by side in one run (interleaved rounds, the order rotated, medians), with the
transposed layers' share of the stock forward and a check that every variant computes what
stock computes.

    python -m perf.model_bench                   # every model, CPU
    python -m perf.model_bench --models dcgan hifigan_v1 --rounds 9

Writes perf/results/models-<device>-<date>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import statistics
import sys
import time

VARIANTS = ("stock", "convert", "convert_fuse")


def _variants(factory, seed=0):
    import torch
    import triton_kstconv as K
    torch.manual_seed(seed)
    stock = factory()
    with torch.no_grad():   # BatchNorms that have seen data: folding is not a no-op
        for m in stock.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.8, 1.2)
    out = {"stock": stock}
    out["convert"], rep = K.convert(copy.deepcopy(stock), report=True)
    out["convert_fuse"], rep_fuse = K.convert(copy.deepcopy(stock), fuse=True, report=True)
    return out, rep, rep_fuse


def _time(fn, rounds_ms=200.0):
    """Median of a few timings of fn() in ms (at least 3, about rounds_ms in all)."""
    fn()
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    reps = max(3, min(50, int(rounds_ms / 1e3 / max(once, 1e-6))))
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    return statistics.median(samples)


def _interleaved(fns: dict, rounds: int) -> dict:
    """{name: [ms per round]}: every function timed once a round, the order rotated."""
    names = list(fns)
    samples = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in (order if r % 2 == 0 else order[::-1]):
            samples[n].append(_time(fns[n]))
    return samples


def _paired(samples: dict, name: str):
    """(median ms, speedup over stock, its quartiles): the speedup is the median of the
    per-round ratios (stock's time over this one's in the same round), so a drift of the
    machine between rounds cancels; the quartiles show the noise left."""
    ratios = [s / v for s, v in zip(samples["stock"], samples[name])]
    quartiles = (statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1
                 else ratios * 2)
    return (statistics.median(samples[name]), statistics.median(ratios),
            (quartiles[0], quartiles[-1]))


def _transposed_share(model, x) -> float:
    """Fraction of the stock eval forward spent inside ConvTranspose modules (forward hooks)."""
    import torch
    spent = [0.0]
    starts = {}

    def pre(mod, inp):
        starts[id(mod)] = time.perf_counter()

    def post(mod, inp, out):
        spent[0] += time.perf_counter() - starts.pop(id(mod))
    hooks = []
    for m in model.modules():
        if isinstance(m, (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d,
                          torch.nn.ConvTranspose3d)):
            hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        with torch.no_grad():
            model(x)
            spent[0] = 0.0
            total = time.perf_counter()
            for _ in range(3):
                model(x)
            total = time.perf_counter() - total
    finally:
        for h in hooks:
            h.remove()
    return spent[0] / max(total, 1e-12)


def measure_model(name, factory, make_input, batch, rounds):
    import torch
    models, rep, rep_fuse = _variants(factory)
    x = make_input(batch)
    for m in models.values():
        m.eval()
    with torch.no_grad():
        ref = models["stock"](x)
        err = {n: ((m(x) - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
               for n, m in models.items()}

    def infer(m):
        def run():
            with torch.no_grad():
                m(x)
        return run
    t_inf = _interleaved({n: infer(m) for n, m in models.items()}, rounds)
    share = _transposed_share(models["stock"], x)
    opts = {n: torch.optim.SGD(m.parameters(), lr=1e-4) for n, m in models.items()}
    for m in models.values():
        m.train()
    losses = {}

    def step(n):
        m, opt = models[n], opts[n]

        def run():
            opt.zero_grad(set_to_none=True)
            loss = m(x).float().square().mean()
            loss.backward()
            opt.step()
            losses.setdefault(n, loss.item())
        return run
    t_train = _interleaved({n: step(n) for n in models}, rounds)
    rows = []
    for n in models:
        infer_ms, infer_speedup, infer_q = _paired(t_inf, n)
        train_ms, train_speedup, train_q = _paired(t_train, n)
        rows.append(dict(model=name, variant=n, batch=batch, infer_ms=infer_ms,
                         train_ms=train_ms, infer_speedup=infer_speedup,
                         train_speedup=train_speedup, infer_speedup_quartiles=infer_q,
                         train_speedup_quartiles=train_q, eval_rel_err=err[n],
                         first_loss=losses.get(n), transposed_share_of_stock_forward=share))
    report = {"convert": [list(r) for r in rep.rows], "convert_fuse": [list(r) for r in
                                                                       rep_fuse.rows]}
    return rows, report


def _geomean(v):
    v = [a for a in v if a and a > 0]
    return math.exp(sum(map(math.log, v)) / len(v)) if v else None


def _with_quartiles(row, mode):
    q = row.get(f"{mode}_speedup_quartiles")
    text = f"{row[f'{mode}_speedup']:.2f}"
    return text if q is None or row["variant"] == "stock" else f"{text} ({q[0]:.2f}-{q[1]:.2f})"


def markdown(rows, meta) -> str:
    lines = [f"# Real models: stock vs convert() vs convert(fuse=True) — {meta['device_name']}",
             "", f"{meta['date']}, torch {meta['torch']}, {meta['threads']} threads, vector ISA "
             f"{meta.get('cpu_isa')}. Times in ms, medians of {meta['rounds']} interleaved "
             "rounds; speedups over stock (higher is better): the median of the per-round "
             "ratios, their quartiles in brackets (the noise). Training: forward, mean-square "
             "loss, backward, SGD step. Share: the transposed layers' part of the stock eval "
             "forward.", "",
             "| model | batch | variant | infer ms | ×stock | train ms | ×stock | eval rel. err "
             "| share |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['infer_ms']:.2f} | "
                     f"{_with_quartiles(r, 'infer')} | {r['train_ms']:.2f} | "
                     f"{_with_quartiles(r, 'train')} | {r['eval_rel_err']:.1e} | "
                     f"{100 * r['transposed_share_of_stock_forward']:.0f} % |")
    lines += ["", "| variant | geomean infer ×stock | geomean train ×stock | worst train |",
              "|---|---|---|---|"]
    for v in VARIANTS[1:]:
        sel = [r for r in rows if r["variant"] == v]
        worst = min(sel, key=lambda r: r["train_speedup"])
        lines.append(f"| {v} | {_geomean([r['infer_speedup'] for r in sel]):.2f} | "
                     f"{_geomean([r['train_speedup'] for r in sel]):.2f} | "
                     f"{worst['train_speedup']:.2f} ({worst['model']}) |")
    return "\n".join(lines) + "\n"


def chart(rows, path, meta):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for ax, key, title in ((axes[0], "infer_speedup", "inference"),
                           (axes[1], "train_speedup", "training step")):
        for j, v in enumerate(VARIANTS[1:]):
            vals = [next(r[key] for r in rows if r["model"] == m and r["variant"] == v)
                    for m in models]
            ax.bar([i + (j - 0.5) * 0.4 for i in range(len(models))], vals, 0.4, label=v)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("× stock")
        ax.set_title(f"{meta['device_name']} — {title}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    from perf.bench import _ensure_allocator_setting
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-malloc-env", action="store_true")
    args = ap.parse_args(argv)
    if not args.no_malloc_env:
        _ensure_allocator_setting(argv, module="perf.model_bench")
    from perf import models as Z
    from perf.runner import metadata
    meta = dict(metadata("cpu"), rounds=args.rounds)
    rows, reports = [], {}
    for name, (factory, make_input, batch) in Z.zoo("cpu").items():
        if args.models and name not in args.models:
            continue
        r, rep = measure_model(name, factory, make_input, batch, args.rounds)
        rows += r
        reports[name] = rep
        for row in r:
            print(f"  {name:20s} {row['variant']:13s} infer {row['infer_ms']:9.2f} ms "
                  f"(x{row['infer_speedup']:.2f})  train {row['train_ms']:9.2f} ms "
                  f"(x{row['train_speedup']:.2f})  err {row['eval_rel_err']:.1e}", flush=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M")
    prefix = args.out or os.path.join(os.path.dirname(__file__), "results", f"models-cpu-{stamp}")
    with open(prefix + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows, "conversions": reports}, f, indent=1)
    md = markdown(rows, meta)
    with open(prefix + ".md", "w") as f:
        f.write(md)
    try:
        chart(rows, prefix + ".png", meta)
    except ImportError:
        pass
    print(md)
    return rows


if __name__ == "__main__":
    main()
