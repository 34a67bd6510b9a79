"""The C++ engine's two backward paths on the real-layer suite, side by side with oneDNN's own
backward (grad_input + grad_weight + grad_bias of one layer; the forward is not in it):

    python -m perf.backward_paths                 # every CPU layer the joint path can run
    python -m perf.backward_paths --layers mnist decoder

"joint" is the one-pass backward (KSTCONV_JOINT=1), "separate" the grad_input and grad_weight
passes plus a sum for the bias, "native" aten.convolution_backward. Interleaved medians. It is
the data behind the engine's rule for when to take the joint path (column "rule"). Writes JSON
and a Markdown table under perf/results/.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

from perf.bench import _ensure_allocator_setting


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", nargs="*", help="substrings of layer keys (model/name)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=None, help="results path prefix")
    args = ap.parse_args(argv)
    _ensure_allocator_setting(argv, module="perf.backward_paths")
    import torch
    from tqdm import tqdm

    from perf import layers as L
    from perf.runner import metadata, time_interleaved
    from triton_kstconv import config, cpp_engine
    from triton_kstconv.ops import geometry_of

    rows = []
    for layer in tqdm(L.select(args.layers), desc="layers", file=sys.stderr):
        nd, k = layer.nd, (layer.kernel,) * layer.nd
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(layer.batch, layer.c_in, *layer.size, generator=gen)
        w = torch.randn(layer.c_in, layer.c_out, *k, generator=gen)
        geom = geometry_of(layer.size, k, (layer.stride,) * nd, (layer.padding,) * nd,
                           (layer.output_padding,) * nd, 1, (1,) * nd)
        gy = torch.randn(layer.batch, layer.c_out, *geom.out_size, generator=gen)

        def joint(mode=1):
            with config.override(joint=mode):
                return cpp_engine.joint_backward(gy, x, w, geom, True, True, True)

        if joint() is None:
            continue  # the joint path cannot run this layer
        rule = joint(-1) is not None

        def separate():
            cpp_engine.grad_input(gy, w, geom)
            cpp_engine.grad_weight(x, gy, w.shape, geom, torch.float32)
            gy.sum([0, *range(2, gy.dim())])

        def native():
            torch.ops.aten.convolution_backward(
                gy, x, w, [layer.c_out], [layer.stride] * nd, [layer.padding] * nd, [1] * nd,
                True, [layer.output_padding] * nd, 1, [True, True, True])

        t = time_interleaved({"joint": joint, "separate": separate, "native": native}, "cpu",
                             args.rounds)
        rows.append({"layer": layer.key, "rule": rule, **{f"{n}_ms": v for n, v in t.items()},
                     "separate_over_joint": t["separate"] / t["joint"],
                     "native_over_joint": t["native"] / t["joint"]})
        tqdm.write(f"{layer.key:32s} rule={'joint' if rule else 'separate':8s} "
                   f"joint {t['joint']:8.2f}  separate {t['separate']:8.2f}  "
                   f"native {t['native']:8.2f} ms", file=sys.stderr)
    meta = metadata("cpu")
    lines = [f"# C++ backward paths, {meta['device_name']}, {meta['threads']} threads, "
             f"torch {meta['torch']}, {meta['date']}", "",
             "| layer | rule picks | joint ms | separate ms | native ms | separate / joint | "
             "native / joint |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {'joint' if r['rule'] else 'separate'} | "
                     f"{r['joint_ms']:.2f} | {r['separate_ms']:.2f} | {r['native_ms']:.2f} | "
                     f"{r['separate_over_joint']:.2f} | {r['native_over_joint']:.2f} |")
    text = "\n".join(lines)
    print(text)
    prefix = args.out or os.path.join(
        os.path.dirname(__file__), "results",
        "cpu-backward-paths-" + datetime.datetime.now().strftime("%Y%m%d-%H%M"))
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    with open(prefix + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(prefix + ".md", "w") as f:
        f.write(text + "\n")
    print(f"# wrote {prefix}.json / .md")


if __name__ == "__main__":
    main()
