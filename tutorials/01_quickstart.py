"""
Quickstart: a PyTorch model, compiled once, run at every low-bit ratio
=====================================================================

FlexiQ runs a chosen fraction of each layer's input channels (the *low-bit ratio*) in 4-bit and
the rest in 8-bit. One compiled module holds every ratio; switching costs microseconds.

This walkthrough takes the zoo's ResNet-20 (trained on Fashion-MNIST, shipped with the
package), calibrates it on training images, compiles it for this CPU, and measures accuracy and
latency at each ratio.

Run it by hand: ``.venv/bin/python tutorials/01_quickstart.py`` (about 2 minutes).
"""

# %%
# The model and the data
# ----------------------
# Any ``torch.nn.Module`` whose convolutions and linear layers should be quantized works. The
# zoo returns the FP32 model with its sha256-verified checkpoint; the data loaders never mix
# calibration (training split) and evaluation (test split) images.
import time

import numpy as np
from _common import pick

import flexiq_tvm
from flexiq_tvm.zoo import fmnist_calibration, get_model, load_fmnist

model = get_model("resnet20_fmnist")
x_test, y_test = load_fmnist("test", limit=pick(100, 1000))
calib = fmnist_calibration(pick(64, 256))

# %%
# Compile
# -------
# ``FlexiQConfig`` chooses the ratios and how channels are selected. ``static`` is instant;
# ``evolutionary`` (the paper's search, the default) costs minutes and is more accurate at
# high ratios. ``compile`` quantizes (calibration + selection), imports the model into TVM
# Relax, rewrites every covered layer into FlexiQ kernels and builds one module with one entry
# function per ratio, all sharing one set of weights.
cfg = flexiq_tvm.FlexiQConfig(ratios=(0.0, 0.25, 0.5, 0.75, 1.0), selection="static",
                              calib_images=len(calib))
t0 = time.perf_counter()
mod = flexiq_tvm.compile(model, x_test[:1], calib, config=cfg)
print(f"compiled in {time.perf_counter() - t0:.1f} s")
print(mod.report.summary())

# %%
# Switch ratios and measure
# -------------------------
# ``mod(x, ratio=r)`` runs one call at ``r``; ``mod.set_ratio(r)`` changes the default. The
# module was compiled for batch 1 (the example input's shape).
rows = []
for r in mod.ratios:
    mod.set_ratio(r)
    pred = np.array([mod(x_test[i : i + 1]).argmax() for i in range(len(x_test))])
    top1 = float((pred == y_test).mean())
    ms = mod.profile(x_test[:1], repeat=pick(10, 50))[f"{r:g}"]
    rows.append((r, top1, ms))
    print(f"ratio {r:>4g}: top-1 {100 * top1:6.2f} %   batch-1 latency {ms:.3f} ms   "
          f"({100 * mod.plan.mac_fraction(r):.0f} % of eligible MACs in 4-bit)")

t0 = time.perf_counter()
for i in range(1000):
    mod.set_ratio(mod.ratios[i % len(mod.ratios)])
print(f"ratio switch: {1e3 * (time.perf_counter() - t0):.2f} us per set_ratio")
assert all(0.8 < top1 <= 1.0 for _, top1, _ in rows)

# %%
# Deploy
# ------
# ``export`` writes one file with the library of every ratio, the latency profile and metadata
# (checksummed; signed with ``key``). ``flexiq_tvm.load`` runs it with TVM and numpy alone.
from _common import OUT  # noqa: E402

path = mod.export(OUT / "resnet20.flexiq", key=b"tutorial")
loaded = flexiq_tvm.load(path, key=b"tutorial")
assert np.array_equal(loaded(x_test[:1], ratio=0.5), mod(x_test[:1], ratio=0.5))
print(f"exported {path} ({path.stat().st_size // 1024} KiB); reloaded: identical outputs")
