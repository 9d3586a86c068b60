"""
Your own ONNX model: three commands from a file to a server
===========================================================

You hold an ONNX file and a folder of images, not the training code. FlexiQ needs nothing
else: it runs the ONNX graph itself (in torch, with the file's own weights) for calibration and
the channel search, compiles the same graph with TVM and writes one artifact:

.. code-block:: bash

    flexiq-tvm compile model.onnx --calib photos/ --ratios 0,0.5,1 --out model.flexiq
    flexiq-tvm serve model.flexiq --slo-ms 5
    curl -s localhost:8000/v1/infer -H 'Content-Type: application/octet-stream' --data-binary @x.bin

Here "your model" is the zoo's ResNet-20 exported to ONNX with plain ``torch.onnx.export``
(BatchNorm folded into the convs, a dynamic batch axis), and "your images" are Fashion-MNIST
training images saved as PNG files. Run it by hand: ``.venv/bin/python
tutorials/06_your_own_onnx.py`` (about a minute).
"""

# %%
# The user's files: an ONNX model and a folder of images
# -------------------------------------------------------
import json
import subprocess
import sys
import urllib.request

import numpy as np
import torch
from _common import OUT, pick
from PIL import Image

import flexiq_tvm
from flexiq_tvm.zoo import get_model, load_fmnist
from flexiq_tvm.zoo.data import FMNIST_MEAN, FMNIST_STD, load_fmnist_raw

onnx_path = OUT / "my_model.onnx"
torch.onnx.export(get_model("resnet20_fmnist").eval(), (torch.zeros(1, 1, 28, 28),),
                  str(onnx_path), dynamo=False, input_names=["image"],
                  dynamic_axes={"image": {0: "batch"}})
photos = OUT / "my_photos"
photos.mkdir(exist_ok=True)
images, _ = load_fmnist_raw("train")
for i in range(pick(32, 256)):
    Image.fromarray(images[i * 200]).save(photos / f"{i:03d}.png")

# %%
# 1. Compile: calibration, channel selection, one module with a function per ratio
# ---------------------------------------------------------------------------------
# The images are already 28 x 28 (``--resize 28``: no crop margin) and the model was trained
# on Fashion-MNIST's mean and std, so those replace the ImageNet defaults. The table shows,
# per ratio, the share of MACs in 4-bit, the layers covered, the ops left in FP32 and how close
# the outputs stay to the FP32 model (onnxruntime) on the calibration images.
flexiq = [sys.executable, "-m", "flexiq_tvm.cli"]
artifact = OUT / "my_model.flexiq"
subprocess.run([*flexiq, "compile", str(onnx_path), "--calib", str(photos), "--resize", "28",
                "--mean", f"{FMNIST_MEAN}", "--std", f"{FMNIST_STD}",
                "--ratios", "0,0.5,1", "--out", str(artifact)], check=True)

# %%
# 2. Serve it (here on a free port, in the background)
# -----------------------------------------------------
server = subprocess.Popen([*flexiq, "serve", str(artifact), "--ratio", "0.5", "--port", "0"],
                          stdout=subprocess.PIPE, text=True)
url = server.stdout.readline().split(" on ")[1].split(" ")[0]

# %%
# 3. Ask it: one test image as raw float32 bytes
# -----------------------------------------------
x, y = load_fmnist("test", limit=pick(20, 200))
correct = 0
try:
    for i in range(len(x)):
        req = urllib.request.Request(url + "/v1/infer", data=x[i].astype("<f4").tobytes(),
                                     headers={"Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(req, timeout=30) as r:
            correct += int(np.argmax(json.loads(r.read())["output"]) == y[i])
finally:
    server.terminate()
    server.wait(20)
print(f"served at ratio 0.5: top-1 {100 * correct / len(x):.1f} % on {len(x)} test images")

# %%
# The same artifact in Python, without torch
# -------------------------------------------
mod = flexiq_tvm.load(artifact)
print("ratios", mod.ratios, "latency profile (ms)", mod.metadata.get("profile_ms"))
assert correct >= 0.8 * len(x)
