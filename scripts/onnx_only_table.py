"""Compile time and SQNR per ratio for the six test architectures, each compiled from its
ONNX file alone (the torch module discarded), as tests/test_onnx_only.py builds them.

    .venv/bin/python scripts/onnx_only_table.py [--exporter torchscript|dynamo] [--json F]

Prints one Markdown row per architecture: covered layers, gathers, compile time (calibration,
static selection, build; ratios 0, 0.5 and 1) and the SQNR of the outputs against
onnxruntime FP32 on 16 held-out random inputs at each ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--exporter", default="torchscript", choices=("torchscript", "dynamo"),
                    help="torch's ONNX exporter (default torchscript)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import onnxruntime as ort
    import torch

    import flexiq_tvm
    from flexiq_tvm import FlexiQConfig
    from flexiq_tvm.usermodel import sqnr_db
    from test_onnx_only import ARCHS, _data, _export

    rows = []
    print("| architecture | layers covered | gathers | compile s | SQNR r=0 | r=0.5 | r=1 |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for arch, cls in ARCHS.items():
            torch.manual_seed(0)
            x = _data()
            path = _export(cls(), x, Path(tmp) / f"{arch}.onnx", args.exporter)
            cfg = FlexiQConfig(selection="static", ratios=(0, 0.5, 1), calib_images=64)
            t = time.perf_counter()
            cm = flexiq_tvm.compile(str(path), x[:1], x[16:], config=cfg)
            dt = time.perf_counter() - t
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            held = x[:16]  # not among the calibration samples x[16:]
            ref = sess.run(None, {"image": held})[0]
            sq = {}
            for r in cm.ratios:
                y = np.concatenate([cm(held[i : i + 1], ratio=r) for i in range(len(held))])
                sq[f"{r:g}"] = sqnr_db(ref, y)
            row = {"arch": arch, "exporter": args.exporter, "covered": len(cm.report.covered),
                   "gathers": len(cm.report.gathers), "compile_s": dt, "sqnr_db": sq}
            rows.append(row)
            print(f"| {arch} | {row['covered']} | {row['gathers']} | {dt:.1f} | "
                  f"{sq['0']:.1f} | {sq['0.5']:.1f} | {sq['1']:.1f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
