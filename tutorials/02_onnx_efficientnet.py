"""
An ONNX model: EfficientNet-Lite0, and its accuracy-latency trade-off
====================================================================

Models often arrive as ONNX files. The compiler takes the ONNX graph; the quantization plan is
computed on the torch source of the same weights (calibration needs to run the model), and each
plan layer is found in the ONNX graph by its weights.

EfficientNet-Lite0 (ImageNet, pretrained, installed offline by ``make setup``) is a depthwise
model that a uniform 4-bit ratio destroys: the cross-layer ``greedy`` allocation keeps the
sensitive layers 8-bit. We measure top-1 agreement with FP32 and latency per ratio on held-out
natural photos and plot the trade-off.

Run it by hand: ``.venv/bin/python tutorials/02_onnx_efficientnet.py`` (about 10 minutes).
"""

# %%
# Export the ONNX file, compute the plan on the torch model
# ---------------------------------------------------------
import numpy as np
from _common import OUT, pick

import flexiq_tvm
from flexiq_tvm import frontend
from flexiq_tvm.eval import load_calibration, load_eval_data
from flexiq_tvm.fakequant import predict
from flexiq_tvm.zoo import get_model

name = "efficientnet_lite0_imagenet"
torch_model = get_model(name)
onnx_path = OUT / "efficientnet_lite0.onnx"
frontend.export_onnx(torch_model, np.zeros((1, 3, 224, 224), np.float32), onnx_path)

cfg = flexiq_tvm.FlexiQConfig(ratios=(0.0, 0.25, 0.5), selection=pick("static", "greedy"),
                              calib_images=pick(8, 128), search_images=pick(4, 16),
                              sensitivity_steps=4)
plan = flexiq_tvm.quantize(torch_model, load_calibration(name, cfg.calib_images), cfg,
                           model_name=name, progress=False)

# %%
# Compile the ONNX file
# ---------------------
_, x, _ = load_eval_data(name, limit=pick(4, 200))
mod = flexiq_tvm.compile(str(onnx_path), x[:1], plan=plan, config=cfg)
print(mod.report.summary().splitlines()[0])

# %%
# Accuracy (agreement with FP32) and latency per ratio
# ----------------------------------------------------
fp32 = predict(torch_model, x).argmax(1)
points = []
for r in mod.ratios:
    pred = np.array([mod(x[i : i + 1], ratio=r).argmax() for i in range(len(x))])
    agree = float((pred == fp32).mean())
    ms = mod.profile(x[:1], repeat=pick(3, 20))[f"{r:g}"]
    points.append((r, agree, ms))
    print(f"ratio {r:>4g}: agreement with FP32 {100 * agree:6.2f} %   {ms:.2f} ms")
assert points[0][1] >= 0.5  # INT8 keeps the FP32 answer

# %%
# Plot the trade-off
# ------------------
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(5, 3.5))
ax.plot([p[2] for p in points], [100 * p[1] for p in points], "o-")
for r, agree, ms in points:
    ax.annotate(f"r={r:g}", (ms, 100 * agree), textcoords="offset points", xytext=(5, 5))
ax.margins(0.15)  # room for the labels
ax.set_xlabel("batch-1 latency (ms), this CPU")
ax.set_ylabel("top-1 agreement with FP32 (%)")
ax.set_title("EfficientNet-Lite0 (ONNX) with FlexiQ")
fig.tight_layout()
png = OUT / "efficientnet_lite0_tradeoff.png"
fig.savefig(png, dpi=120)
print(f"wrote {png}")
