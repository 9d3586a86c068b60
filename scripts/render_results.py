#!/usr/bin/env python
"""Render eval JSON files (``flexiq-tvm eval --ratios ... --json``) as Markdown tables.

Usage: ``python scripts/render_results.py docs/results/*.quant.json``; prints to stdout.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def pct(v) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def render(doc: dict) -> str:
    lines = []
    fp32 = doc["fp32"]["top1"]
    imagenet = doc["n_labelled"] < doc["n_images"]
    lines.append(f"### {doc['model']} ({doc['dataset']}, {doc['n_images']} images"
                 + (f", {doc['n_labelled']} labelled" if imagenet else "") + ")")
    lines.append("")
    lines.append(f"FP32 top-1 {pct(fp32)}%.")
    lines.append("")
    rows = defaultdict(dict)
    ratios = []
    for r in doc["results"]:
        if r["ratio"] is None:
            continue
        rows[r["method"]][r["ratio"]] = r
        if r["ratio"] not in ratios:
            ratios.append(r["ratio"])
    metric = "agreement with FP32" if imagenet else "top-1"
    lines.append(f"{metric} (%) per low-bit ratio (fraction of eligible MACs in 4-bit):")
    lines.append("")
    lines.append("| method | " + " | ".join(f"{r:g}" for r in ratios) + " |")
    lines.append("|---|" + "---|" * len(ratios))
    for method, per in rows.items():
        key = "agreement" if imagenet else "top1"
        lines.append(f"| {method} | " + " | ".join(pct(per[r][key]) for r in ratios) + " |")
    for r in doc["results"]:
        if r["ratio"] is None:
            key = "agreement" if imagenet else "top1"
            lines.append(f"| {r['method']} (all eligible layers) | {pct(r[key])} |"
                         + " |" * (len(ratios) - 1))
    if imagenet:
        lines.append("")
        lines.append("top-1 on labelled views (%) and KL(FP32 || quantized) in nats:")
        lines.append("")
        lines.append("| method | " + " | ".join(f"{r:g}" for r in ratios) + " |")
        lines.append("|---|" + "---|" * len(ratios))
        for method, per in rows.items():
            lines.append(f"| {method} | " + " | ".join(
                f"{pct(per[r]['top1'])} / {per[r]['kl']:.3f}" for r in ratios) + " |")
    ev = rows.get("flexiq-evolutionary") or rows.get("flexiq-greedy")
    if ev:
        lines.append("")
        lines.append("Channel fraction in 4-bit at each MAC ratio ("
                     + ("evolutionary" if "flexiq-evolutionary" in rows else "greedy") + "): "
                     + ", ".join(f"{r:g} → {ev[r]['channel_fraction']:.3f}" for r in ratios)
                     + f". Selection time {ev[ratios[0]]['selection_seconds']:.0f} s.")
    return "\n".join(lines)


def main(paths: list[str]) -> None:
    for p in paths:
        with open(p) as f:
            print(render(json.load(f)))
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
