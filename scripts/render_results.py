#!/usr/bin/env python
"""Render eval JSON files and the zoo manifest as Markdown tables (printed to stdout).

Usage: ``python scripts/render_results.py [--zoo] docs/results/*.json``: ``--zoo`` prints the
manifest table; ``*.fp32.json`` files give the frontend table, ``*.quant.json`` the FlexiQ ones.
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


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_zoo() -> str:
    from flexiq_tvm.zoo.registry import MODELS, read_manifest

    man = read_manifest()
    rows = [[name, pct(e["top1"]), pct(spec.min_top1), e["recipe"]["epochs"],
             f"{e['train_seconds'] / 60:.0f} min", f"{e['size_bytes'] / 1e6:.2f} MB",
             f"`{e['command']}`"]
            for name, spec in MODELS.items() if (e := man.get(name)) is not None]
    return _table(["model", "FP32 top-1 (%)", "bar (%)", "epochs", "train time", "size",
                   "command"], rows)


def render_fp32(docs: list[dict]) -> str:
    rows = [[d["model"], d["dataset"], d["n_images"], pct(d["fp32"]["top1"]), r["frontend"],
             r["n_images"], pct(r["agreement"]), f"{r['max_abs_logit_diff']:.1e}"]
            for d in docs for r in d["results"]]
    return _table(["model", "data", "images", "torch top-1 (%)", "TVM via", "TVM images",
                   "agreement (%)", "max abs logit diff"], rows)


def main(args: list[str]) -> None:
    if "--zoo" in args:
        print(render_zoo())
        print()
    paths = [a for a in args if a != "--zoo"]
    docs = []
    for p in paths:
        with open(p) as f:
            docs.append((p, json.load(f)))
    fp32 = [d for p, d in docs if p.endswith(".fp32.json")]
    if fp32:
        print(render_fp32(fp32))
        print()
    for p, d in docs:
        if p.endswith(".quant.json"):
            print(render(d))
            print()


if __name__ == "__main__":
    main(sys.argv[1:])
