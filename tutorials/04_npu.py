"""
The FlexiNPU target: compile, cycles per ratio, ratio switch
============================================================

FlexiNPU is a simulated accelerator, a systolic array whose 8-bit MACs each split into two 4-bit
MACs. It is reached through TVM's bring-your-own-codegen. The covered layers, with their bias,
BatchNorm and activation, plus the residual adds, become NPU programs; everything else runs on
the CPU. A ratio switch writes each layer's low-channel boundary register in instruction
memory; nothing is recompiled. ``target/npu/README.md`` describes the machine.

Run it by hand: ``.venv/bin/python tutorials/04_npu.py`` (about 1 minute).
"""

# %%
# Compile for the NPU
# -------------------
import time

import numpy as np
from _common import pick
from flexiq_tvm.target import npu

import flexiq_tvm
from flexiq_tvm.zoo import fmnist_calibration, get_model, load_fmnist

model = get_model("mobilenetv2_fmnist")
x, y = load_fmnist("test", limit=pick(20, 500))
cfg = flexiq_tvm.FlexiQConfig(selection="static", calib_images=64)
config = npu.NPUConfig(rows=16, cols=16, dma_bytes_per_cycle=16, clock_mhz=1000)
mod = flexiq_tvm.compile(model, x[:1], fmnist_calibration(64), config=cfg, target="flexiq_npu",
                         npu_config=config)
programs = mod.metadata["npu"]["programs"]
print(f"{len(programs)} NPU programs, {len(mod.report.covered)} of {len(mod.plan.layers)} plan "
      f"layers offloaded; kept on the host: {[k['op'] for k in mod.report.kept_fp32]}")

# %%
# Accuracy and cycles per ratio
# -----------------------------
# ``npu.read_stats`` returns the simulator's counters per program. These are compute cycles
# on the array, DMA cycles, vector-unit cycles, and the total with DMA/compute overlap.
cycles = {}
for r in mod.ratios:
    pred = np.array([mod(x[i : i + 1], ratio=r).argmax() for i in range(len(x))])
    npu.read_stats(mod, reset=True)
    mod(x[:1], ratio=r)
    stats = npu.read_stats(mod, reset=True)
    cycles[r] = sum(p["total_cycles"] for p in stats)
    print(f"ratio {r:>4g}: top-1 {100 * (pred == y).mean():6.2f} %  NPU cycles {cycles[r]:>8}  "
          f"modeled {cycles[r] / config.clock_mhz:7.1f} us  "
          f"speedup {cycles[0.0] / cycles[r]:.2f}x")
gain = (cycles[0.0] - cycles[0.5]) / (cycles[0.0] - cycles[1.0])
print(f"ratio 0.5 gets {100 * gain:.0f} % of the ratio-1.0 cycle saving")
assert cycles[1.0] < cycles[0.0]

# %%
# The slowest layer programs at ratio 0
# -------------------------------------
npu.read_stats(mod, reset=True)
mod(x[:1], ratio=0.0)
for p in sorted(npu.read_stats(mod), key=lambda p: -p["total_cycles"])[:5]:
    print(f"  {p['layer'] or p['pattern']:<28} total {p['total_cycles']:>7}  "
          f"compute {p['compute_cycles']:>7}  dma {p['dma_cycles']:>6}")

# %%
# Ratio switch = instruction-memory patch
# ---------------------------------------
t0 = time.perf_counter()
n = 2000
for i in range(n):
    mod.set_ratio(mod.ratios[i % len(mod.ratios)])
print(f"set_ratio: {1e6 * (time.perf_counter() - t0) / n:.2f} us "
      f"(patches {len(programs)} programs' SETB words)")
