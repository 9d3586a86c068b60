"""The ``flexiq-tvm`` command line: parses arguments and calls one API function each."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path


def _models() -> list[str]:
    from .zoo.registry import MODELS

    return list(MODELS)


def _fmnist_models() -> list[str]:
    """The zoo models trained here (finetuning, compile and load tests take only these)."""
    return [m for m in _models() if "fmnist" in m]


def _write_json(doc: dict, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {path}")


def _fmt(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def cmd_train(args) -> int:
    from .zoo import train

    entry = train.train(args.model, seed=args.seed, epochs=args.epochs, threads=args.threads)
    print(f"{args.model}: FP32 top-1 {_fmt(entry['top1'])} on {entry['n_test_images']} test "
          f"images; checkpoint sha256 {entry.get('sha256', '-')[:16]}")
    return 0


def _search_overrides(args) -> dict:
    names = ("seed", "calib_images", "search_images", "population", "generations",
             "sensitivity_steps", "search_metric")
    out = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if getattr(args, "depthwise_8bit", False):
        out["depthwise_low"] = False
    if getattr(args, "reconstruct", False):
        out["reconstruct"] = True
    return out


def _add_search_args(p) -> None:
    p.add_argument("--seed", type=int, default=None, help="selection seed (default 0)")
    p.add_argument("--calib-images", type=int, default=None, help="default 256")
    p.add_argument("--search-images", type=int, default=None, help="default 64")
    p.add_argument("--population", type=int, default=None,
                   help="evolutionary population (default 12)")
    p.add_argument("--generations", type=int, default=None,
                   help="evolutionary generations per ratio (default 16)")
    p.add_argument("--sensitivity-steps", type=int, default=None,
                   help="points per layer sensitivity curve (default 8)")
    p.add_argument("--search-metric", choices=("mse", "kl"), default=None,
                   help="what the search minimises: mse to the INT8 outputs (default) or "
                        "KL(FP32 || candidate) of the softmax (classifiers)")
    p.add_argument("--depthwise-8bit", action="store_true",
                   help="keep depthwise convs 8-bit (the ratio then counts the other layers)")
    p.add_argument("--reconstruct", action="store_true",
                   help="learn the weight codes by nested GPTQ on the calibration images "
                        "(instead of nearest rounding)")


def cmd_quantize(args) -> int:
    from .config import FlexiQConfig, parse_ratios
    from .eval import load_calibration
    from .quantize import quantize
    from .zoo import registry

    cfg = FlexiQConfig(ratios=parse_ratios(args.ratios), selection=args.selection,
                       extraction=args.extraction, **_search_overrides(args))
    model = registry.get_model(args.model)
    plan = quantize(model, load_calibration(args.model, cfg.calib_images, cfg.seed), cfg,
                    args.model)
    plan.save(args.out)
    m = plan.metrics
    print(f"{args.model}: {len(plan.layers)} layers ({sum(lp.eligible for lp in plan.layers)} "
          f"eligible); calibration {m['calibration_seconds']:.1f} s, {args.selection} "
          f"selection {m['selection_seconds']:.1f} s ({m['selection_evaluations']} evaluations)")
    for r in plan.ratios:
        print(f"  ratio {r:g}: MAC fraction {plan.mac_fraction(r):.3f}, channel fraction "
              f"{plan.channel_fraction(r):.3f}")
    print(f"wrote {args.out}")
    return 0


def cmd_eval(args) -> int:
    from .config import parse_ratios
    from .eval import evaluate_fp32, evaluate_quantized

    if args.ratios is None:
        doc = evaluate_fp32(args.model, limit=args.limit,
                            tvm_limit=500 if args.tvm_limit is None else args.tvm_limit,
                            vias=tuple(args.via or ("torch.export",)))
    else:
        overrides = _search_overrides(args)
        doc = evaluate_quantized(args.model, parse_ratios(args.ratios),
                                 tuple(s.strip() for s in args.selection.split(",")),
                                 limit=args.limit, config_overrides=overrides,
                                 plan_dir=args.save_plans)
    print(f"{doc['model']} on {doc['dataset']} ({doc['n_images']} images, "
          f"{doc['n_labelled']} labelled): FP32 top-1 {_fmt(doc['fp32']['top1'])}")
    print(f"  {'method':<22} {'ratio':>5} {'top-1':>8} {'agree':>8} {'KL':>8} "
          f"{'MACs':>6} {'chans':>6}")
    for r in doc["results"]:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:g}"
        mac = f"{r['mac_fraction']:.3f}" if "mac_fraction" in r else "-"
        ch = f"{r['channel_fraction']:.3f}" if "channel_fraction" in r else "-"
        kl = f"{r['kl']:.4f}" if r.get("kl") is not None else "-"
        print(f"  {r['method']:<22} {ratio:>5} {_fmt(r['top1']):>8} "
              f"{_fmt(r['agreement']):>8} {kl:>8} {mac:>6} {ch:>6}")
    _write_json(doc, args.json)
    return 0


def _target(args):
    """``--target`` as ``compile`` takes it: the name, or for ``cuda`` the target with
    ``--arch``."""
    if args.target != "cuda":
        return args.target
    if not args.arch:
        raise ValueError("--target cuda needs --arch (e.g. sm_80, sm_90)")
    return {"kind": "cuda", "arch": args.arch}


def cmd_compile(args) -> int:
    from .demo import compile_and_measure, print_compiled
    from .plan import QuantPlan

    if args.source and args.model:
        raise ValueError(f"give the model once: {args.source!r} or --model {args.model}")
    name = args.source or args.model
    if name is None:
        raise ValueError("which model? give an .onnx or .pt2 file or a zoo name "
                         f"({', '.join(_models())})")
    if args.out or args.calib or name not in _fmnist_models():
        return _compile_to_artifact(name, args)
    plan = QuantPlan.load(args.plan) if args.plan else None
    target = _target(args)
    if isinstance(target, dict):
        import tvm

        if not tvm.cuda(0).exist:
            raise ValueError("--target cuda measures on a GPU and this machine has none; "
                             "flexiq_tvm.compile(..., target={'kind': 'cuda', 'arch': ...}) "
                             "builds without one")
    res = compile_and_measure(name, plan=plan, selection=args.selection, via=args.via,
                              n_images=args.limit, finetuned=args.finetuned, target=target)
    print_compiled(res)
    if args.json:
        doc = {k: v for k, v in res.items() if k != "report"}
        doc["report"] = res["report"].as_dict()
        _write_json(doc, args.json)
    return 0


def _artifact_key(args) -> bytes | None:
    """The HMAC key of ``--key-file`` (or ``FLEXIQ_ARTIFACT_KEY``): what compile signs
    artifacts with and serve requires of them."""
    if args.key_file:
        with open(args.key_file, "rb") as f:
            return f.read().strip()
    env = os.environ.get("FLEXIQ_ARTIFACT_KEY")
    return env.encode() if env else None


def _compile_to_artifact(name: str, args) -> int:
    """``compile MODEL --calib DATA --out model.flexiq``: a file (or zoo model) to an
    artifact, with a summary table (flexiq_tvm.usermodel)."""
    from . import usermodel
    from .config import parse_ratios

    if args.plan or args.finetuned or args.via != "torch.export":
        raise ValueError("--plan, --finetuned and --via apply to zoo models measured without "
                         "--out")
    out = Path(args.out) if args.out else Path(Path(name).stem + ".flexiq")
    ratios = parse_ratios(args.ratios)
    if any(not 0.0 <= r <= 1.0 for r in ratios):
        raise ValueError(f"--ratios {args.ratios}: each ratio must be in [0, 1]")
    size = None
    if args.input_size:
        try:
            hw = [int(v) for v in args.input_size.split(",")]
        except ValueError:
            raise ValueError(f"--input-size {args.input_size!r}: expected H or H,W") from None
        if len(hw) not in (1, 2) or min(hw) <= 0:
            raise ValueError(f"--input-size {args.input_size!r}: expected H or H,W")
        size = (hw[0], hw[-1])
    if args.batch < 1:
        raise ValueError(f"--batch {args.batch}: must be at least 1")
    key = _artifact_key(args)
    mean, std = usermodel.parse_floats(args.mean, "mean"), usermodel.parse_floats(args.std, "std")
    doc = usermodel.compile_to_artifact(
        name, args.calib, out, ratios, selection=args.selection, target=_target(args),
        batch=args.batch, input_size=size, mean=mean, std=std, resize=args.resize,
        calib_images=args.calib_images, key=key, progress=sys.stderr.isatty(),
        reconstruct=args.reconstruct)
    usermodel.print_summary(doc)
    _write_json(doc, args.json)
    return 0


def cmd_bench(args) -> int:
    from . import bench

    if args.target == "flexiq_npu":
        models = tuple(args.models.split(",")) if args.models else tuple(_fmnist_models())
        for m in models:
            if m not in _models():
                raise ValueError(f"unknown model {m!r}; choose from {_models()}")
        from .target.npu import NPUConfig

        doc = bench.bench_npu(models, config=NPUConfig(
            **{k: v for k, v in (("rows", args.npu_rows), ("cols", args.npu_cols)) if v}))
        bench.print_npu(doc)
        _write_json(doc, args.json)
        return 0

    systems = tuple(args.systems.split(",")) if args.systems else (*bench.PEERS, "flexiq-llvm")
    unknown = set(systems) - set((*bench.PEERS, "flexiq-llvm"))
    if unknown:
        raise ValueError(f"unknown systems {sorted(unknown)}; choose from "
                         f"{[*bench.PEERS, 'flexiq-llvm']}")
    models = tuple(args.models.split(",")) if args.models else bench.DEFAULT_MODELS
    for m in models:
        if m not in _models():
            raise ValueError(f"unknown model {m!r}; choose from {_models()}")
    batches = tuple(int(b) for b in args.batches.split(","))
    isas = args.isa or bench.isas_to_bench()
    if args.kernels_only:
        doc = {"machine": bench.machine(), "rows": [], "isas": isas,
               "kernels": bench.bench_kernels(isas=isas), "switch_us": None}
        doc["summary"] = bench.summarize(doc)
    else:
        doc = bench.run(models, batches, repeat=args.repeat, systems=systems,
                        kernels=not args.no_kernels, isas=isas)
    bench.print_bench(doc)
    _write_json(doc, args.json)
    return 0


def cmd_serve(args) -> int:
    import signal
    import threading

    from .runtime import AdaptivePolicy, StaticPolicy, load
    from .runtime.server import InferenceServer, raise_open_files_limit, worker_profile

    mod = load(args.artifact, key=_artifact_key(args))
    if args.ratio is not None:
        policy = StaticPolicy(mod._checked(args.ratio))
    else:
        if args.slo_ms is None:
            raise ValueError("--slo-ms is required for the adaptive policy (or give --ratio)")
        profile = worker_profile(mod, args.threads)  # as the worker will run
        policy = AdaptivePolicy(profile, args.slo_ms)
    raise_open_files_limit()  # the default connection limit follows it
    # SIGTERM's handler is in place before the "serving" line that tells a supervisor (or a
    # test) the server is up: a SIGTERM sent right after it must stop it cleanly, not kill it
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: done.set())
    mib = 2**20
    limits = {"max_connections": args.max_connections, "idle_timeout": args.idle_timeout,
              "header_timeout": args.header_timeout, "body_timeout": args.body_timeout,
              "max_body": int(args.max_body_mb * mib),
              "max_inflight_bytes": int(args.max_inflight_mb * mib),
              "max_json": None if args.max_json_mb is None else int(args.max_json_mb * mib)}
    srv = InferenceServer(mod, policy, host=args.host, port=args.port,
                          max_queue=args.max_queue, threads=args.threads, **limits).start()
    how = f"static {args.ratio:g}" if args.ratio is not None else (
        f"adaptive over {[f'{r:g}' for r in policy.ratios]}" + (
            f"; {[f'{r:g}' for r in policy.skipped]} skipped: not 3 % faster than a more "
            "accurate ratio here" if policy.skipped else ""))
    print(f"serving {args.artifact} on {srv.url} (ratios {list(mod.ratios)}, {how}); "
          "Ctrl-C stops", flush=True)
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    srv.stop()
    return 0


def cmd_loadtest(args) -> int:
    from .runtime import load, loadtest

    if args.trace != "bursty":
        raise ValueError(f"trace {args.trace!r}; available: bursty")
    if args.duration <= 0 or args.duration > 3600:
        raise ValueError("--duration must be in (0, 3600] seconds")
    if args.artifact:
        mod = load(args.artifact)
        accuracy = mod.metadata.get("accuracy") or {}
        x = None
    else:
        import flexiq_tvm

        from .config import FlexiQConfig
        from .demo import top1_per_ratio
        from .eval import load_calibration, load_eval_data
        from .zoo import registry

        model = registry.get_model(args.model)
        _, xs, ys = load_eval_data(args.model, args.accuracy_images)
        cfg = FlexiQConfig(selection=args.selection, calib_images=64)
        mod = flexiq_tvm.compile(model, xs[:1], load_calibration(args.model, 64), config=cfg)
        accuracy = {f"{r:g}": a for r, a in top1_per_ratio(mod, xs, ys).items()}
        x = xs[0]
    doc = loadtest.run(mod, accuracy, duration_s=args.duration, slo_ms=args.slo_ms,
                       x=x, plot=args.plot, threads=args.threads)
    print(f"SLO {doc['slo_ms']:.2f} ms; trace: {doc['trace']['requests']} requests, base "
          f"{doc['trace']['base_rps']:.0f} rps, bursts {doc['trace']['burst_rps']:.0f} rps")
    print(f"  {'config':<10} {'p50 ms':>8} {'p99 ms':>8} {'SLO %':>7} {'rps':>7} {'top-1':>7} "
          f"{'gen CPU':>8}")
    for c in doc["configs"]:
        top1 = "-" if c["mean_top1"] is None else f"{100 * c['mean_top1']:.2f}"
        print(f"  {c['name']:<10} {c['p50_ms']:>8.2f} {c['p99_ms']:>8.2f} "
              f"{100 * c['slo_attainment']:>7.1f} {c['throughput_rps']:>7.0f} {top1:>7} "
              f"{100 * c['generator_cpu_share']:>7.1f}%")
    if args.json:
        out = {k: v for k, v in doc.items() if k != "timelines"}
        _write_json(out, args.json)
    return 0


def cmd_finetune(args) -> int:
    from .finetune import FinetuneConfig, run
    from .plan import QuantPlan

    cfg = FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                         alpha=args.alpha, train_images=args.train_images,
                         learn_act_scale=args.learn_act_scale, seed=args.seed,
                         steps=args.steps)
    plan = QuantPlan.load(args.plan) if args.plan else None
    doc = run(args.model, cfg, plan=plan, selection=args.selection, limit=args.limit,
              threads=args.threads, save=not args.no_save,
              progress=args.verbose or sys.stderr.isatty())
    print(f"{args.model}: {doc['finetune']['steps']} steps in {doc['finetune']['seconds']:.0f} s;"
          f" {doc['n_images']} test images ({doc['n_labelled']} labelled), FP32 top-1 "
          f"{_fmt(doc['fp32']['top1'])}")
    rows = {(r["method"], r["ratio"]): r for r in doc["results"]}
    ratios = sorted({r for m, r in rows if m == "flexiq-ptq"})
    print(f"  {'ratio':>5} {'top-1 PTQ':>10} {'finetuned':>10} {'agree PTQ':>10} "
          f"{'finetuned':>10}")
    for r in ratios:
        a, b = rows[("flexiq-ptq", r)], rows[("flexiq-finetuned", r)]
        print(f"  {r:>5g} {_fmt(a['top1']):>10} {_fmt(b['top1']):>10} "
              f"{_fmt(a['agreement']):>10} {_fmt(b['agreement']):>10}")
    w4a4 = rows[("uniform-w4a4", None)]
    print(f"  uniform W4A4 (post-training): top-1 {_fmt(w4a4['top1'])}, "
          f"agreement {_fmt(w4a4['agreement'])}")
    if "checkpoint" in doc:
        print(f"  checkpoint: zoo/checkpoints/finetuned/{args.model}.pt + .plan.npz")
    _write_json(doc, args.json)
    return 0


def cmd_tune(args) -> int:
    from .tune import RPCConfig, tune

    target = _target(args)
    rpc = RPCConfig.parse(args.rpc_tracker, args.rpc_key) if args.rpc_tracker else None
    if args.rpc_key and not args.rpc_tracker:
        raise ValueError("--rpc-key needs --rpc-tracker HOST:PORT")
    res = tune(args.model, trials=args.trials, work_dir=args.work_dir, rpc=rpc,
               max_trials_per_task=args.trials_per_task, target=target)
    done = [t for t in res["tasks"] if t["best_us"] is not None]
    print(f"{args.model}: {len(res['tasks'])} tasks tuned ({res['skipped_flexiq_kernels']} "
          f"FlexiQ kernels are hand-scheduled), {res['trials']} trials in {res['seconds']:.0f} s"
          f"{' via RPC ' + res['rpc'] if res['rpc'] else ''}; database {res['database']}")
    for t in sorted(done, key=lambda t: -t["best_us"])[:10]:
        print(f"  {t['task'][:60]:<60} {t['best_us']:>10.2f} us")
    _write_json(res, args.json)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    if args.duration <= 0 or args.duration > 600:
        raise ValueError(f"--duration {args.duration:g}: must be in (0, 600] seconds")
    return run_demo(duration_s=args.duration, out_dir=args.out_dir)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flexiq-tvm",
        description="FlexiQ adaptive INT8/INT4 mixed-precision quantization on Apache TVM.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""typical flow:
  flexiq-tvm eval --model resnet20_fmnist --ratios 0,0.5,1     accuracy per ratio (fake-quant)
  flexiq-tvm quantize --model resnet20_fmnist --out plan.npz    calibration + channel selection
  flexiq-tvm compile --model resnet20_fmnist --plan plan.npz    llvm module, top-1 + latency
  flexiq-tvm tune --model vit_fmnist --trials 64                MetaSchedule for the FP32 glue
  flexiq-tvm bench --target flexiq_npu                          NPU cycles per ratio
  flexiq-tvm finetune --model mobilenetv2_fmnist --epochs 2     one model for every ratio
  flexiq-tvm serve model.flexiq --slo-ms 5                      adaptive HTTP serving

Python API: flexiq_tvm.compile / load / quantize; tutorials/ walks through each.""",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a Fashion-MNIST zoo model (seeded) and commit it",
                       description="Train a zoo model with its fixed recipe; writes the "
                       "checkpoint and its manifest entry (sha256, accuracy, command).")
    t.add_argument("--model", required=True, choices=_fmnist_models())
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    t.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="accuracy of a zoo model: FP32, TVM build, FlexiQ ratios",
                       description="Evaluate a zoo model. Without --ratios: FP32 top-1 in "
                       "torch on the test data and the TVM build's agreement with torch. With "
                       "--ratios: FlexiQ (fake-quant, integer-exact) accuracy per ratio and "
                       "selection, plus the baselines, in one run. Prints and writes JSON.")
    e.add_argument("--model", required=True, choices=_models())
    e.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    e.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    e.add_argument("--tvm-limit", type=int, default=None,
                   help="FP32 mode: images run through TVM (default 500; 0 skips TVM)")
    e.add_argument("--ratios", default=None, metavar="R,R,...",
                   help="evaluate FlexiQ at these low-bit ratios (e.g. 0,0.25,0.5,0.75,1) "
                   "with the baselines FP32, uniform-w4a4, naive-truncation and random")
    e.add_argument("--selection", default="static,greedy,evolutionary",
                   help="FlexiQ channel selections to run (comma list; default all three)")
    _add_search_args(e)
    e.add_argument("--save-plans", metavar="DIR", default=None,
                   help="write each selection's QuantPlan (.npz) here")
    e.add_argument("--via", choices=("torch.export", "onnx"), action="append",
                   help="frontend of the TVM build (repeatable; default torch.export)")
    e.set_defaults(func=cmd_eval)

    q = sub.add_parser("quantize", help="calibrate a zoo model and select channels -> plan",
                       description="Calibrate a zoo model, choose extraction shifts and nested "
                       "4-bit channel sets, and write the QuantPlan (.npz) the compiler uses.")
    q.add_argument("--model", required=True, choices=_models())
    q.add_argument("--out", required=True, metavar="PATH", help="plan file to write (.npz)")
    q.add_argument("--ratios", default="0,0.25,0.5,0.75,1", metavar="R,R,...")
    q.add_argument("--selection", default="evolutionary",
                   choices=("static", "greedy", "evolutionary", "random"))
    q.add_argument("--extraction", default="effective", choices=("effective", "naive"))
    _add_search_args(q)
    q.set_defaults(func=cmd_quantize)

    c = sub.add_parser("compile", help="compile a model (.onnx, .pt2 or a zoo name) into an "
                       "artifact, or measure a zoo model",
                       description="MODEL.onnx / MODEL.pt2 (or a zoo name) with --calib: "
                       "calibrate, select the channels, compile one module with a function per "
                       "ratio and write the artifact --out (signed with --key-file) that "
                       "`flexiq-tvm serve` takes; prints a table per ratio (share of MACs in "
                       "4-bit, covered layers, ops left in FP32, SQNR vs the FP32 model). A zoo "
                       "FMNIST model without --out / --calib is compiled and measured instead "
                       "(top-1 and batch-1 latency per ratio).")
    c.add_argument("source", nargs="?", metavar="MODEL",
                   help="an .onnx or .pt2 file, or a zoo model name")
    c.add_argument("--model", choices=_fmnist_models(), help="a zoo model to measure")
    c.add_argument("--calib", metavar="DATA", help="calibration data: a folder of images, or "
                   "a .npy / .npz array (N, C, H, W) of preprocessed samples")
    c.add_argument("--out", metavar="PATH", help="artifact to write (default MODEL.flexiq)")
    c.add_argument("--ratios", default="0,0.25,0.5,0.75,1",
                   help="low-bit ratios to compile (default 0,0.25,0.5,0.75,1)")
    c.add_argument("--input-size", metavar="H[,W]", help="input size where the model leaves "
                   "it dynamic; images are resized and center-cropped to it")
    c.add_argument("--batch", type=int, default=1, help="batch size to compile for, where "
                   "the model's batch axis is dynamic (default 1)")
    c.add_argument("--mean", help="per-channel mean for images in [0, 1] (default ImageNet's)")
    c.add_argument("--std", help="per-channel std for images (default ImageNet's)")
    c.add_argument("--resize", type=int, help="resize the short side of images to this before "
                   "the center crop (default input / 0.875, torchvision's 256 for 224)")
    c.add_argument("--calib-images", type=int, default=256,
                   help="calibration samples used (default 256)")
    c.add_argument("--reconstruct", action="store_true",
                   help="learn the weight codes by nested GPTQ on the calibration samples "
                        "(better 4-bit accuracy; docs/quantization.md)")
    c.add_argument("--key-file", help="sign the artifact with this HMAC key (or set "
                   "FLEXIQ_ARTIFACT_KEY)")
    c.add_argument("--plan", metavar="PATH", help="QuantPlan from `flexiq-tvm quantize`")
    c.add_argument("--finetuned", action="store_true",
                   help="compile the committed finetuned model and plan (`flexiq-tvm finetune`)")
    c.add_argument("--selection", default="static",
                   choices=("static", "greedy", "evolutionary", "random"))
    c.add_argument("--via", default="torch.export", choices=("torch.export", "onnx"))
    c.add_argument("--target", default="llvm", choices=("llvm", "flexiq_npu", "cuda"),
                   help="llvm (this CPU), flexiq_npu (the simulated NPU through BYOC) or cuda "
                   "(this machine's GPU, with --arch)")
    c.add_argument("--arch", help="CUDA architecture for --target cuda (e.g. sm_80, sm_90)")
    _add_isa_arg(c)
    c.add_argument("--limit", type=int, default=1000, help="test images per ratio")
    c.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    c.set_defaults(func=cmd_compile)

    b = sub.add_parser("bench", help="latency of FlexiQ modules beside torch, onnxruntime and "
                       "TVM FP32, plus kernel timings", description="Side by side in one run, "
                       "same inputs, medians of repeated runs: torch FP32, onnxruntime FP32 and "
                       "INT8 (static QDQ, per-channel), TVM FP32 (default pipeline) and FlexiQ "
                       "at each ratio; kernel timings; the ratio-switch cost; peak memory.")
    b.add_argument("--models", help="comma list (default: resnet20, mobilenetv2, vit, "
                   "efficientnet-lite0)")
    b.add_argument("--target", default="llvm", choices=("llvm", "flexiq_npu"),
                   help="flexiq_npu: cycles and modeled latency per ratio and per layer on the "
                   "simulated FlexiNPU (batch 1), instead of wall-clock timings")
    b.add_argument("--npu-rows", type=int, default=None, help="FlexiNPU array rows (default 16)")
    b.add_argument("--npu-cols", type=int, default=None,
                   help="FlexiNPU array columns (default 16)")
    b.add_argument("--batches", default="1,32", help="comma list of batch sizes (default 1,32)")
    b.add_argument("--systems", help="comma list of systems to run (default all)")
    b.add_argument("--repeat", type=int, default=20, help="timed runs per figure (default 20)")
    _add_isa_arg(b, many=True)
    b.add_argument("--kernels-only", action="store_true", help="only the kernel timings")
    b.add_argument("--no-kernels", action="store_true", help="skip the kernel timings")
    b.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    b.set_defaults(func=cmd_bench)

    sv = sub.add_parser("serve", help="HTTP inference server over an exported artifact",
                        description="Serve an artifact (module.export) over HTTP: POST "
                        "/v1/infer, GET /healthz and /metrics. The adaptive policy picks the "
                        "most accurate ratio predicted to keep --slo-ms under the current "
                        "queue; a full queue answers 503.")
    sv.add_argument("artifact", help="artifact file written by CompiledModule.export")
    sv.add_argument("--slo-ms", type=float, help="latency target per request (adaptive)")
    sv.add_argument("--ratio", type=float, help="serve one fixed ratio instead")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-queue", type=int, default=64, help="queued requests before 503")
    sv.add_argument("--key-file", help="HMAC key file: refuse artifacts not signed with it "
                    "(or set FLEXIQ_ARTIFACT_KEY)")
    sv.add_argument("--threads", type=int, help="TVM threads of the inference worker "
                    "(default: every CPU but one, left to the HTTP front end)")
    lim = sv.add_argument_group("limits against slow or hostile clients (docs/http.md)")
    lim.add_argument("--max-connections", type=int, help="open connections before new clients "
                     "get 503 (default: what the open-files limit allows, at most 4096)")
    lim.add_argument("--idle-timeout", type=float, default=30.0, metavar="S",
                     help="close a connection idle this long (default 30)")
    lim.add_argument("--header-timeout", type=float, default=10.0, metavar="S",
                     help="408 when a request head is not complete this long after its first "
                     "byte (default 10)")
    lim.add_argument("--body-timeout", type=float, default=30.0, metavar="S",
                     help="408 when a body is not complete this long after its head; also the "
                     "time a client has to take an answer (default 30)")
    lim.add_argument("--max-body-mb", type=float, default=8.0, metavar="MB",
                     help="largest request body, 413 beyond (default 8)")
    lim.add_argument("--max-inflight-mb", type=float, default=64.0, metavar="MB",
                     help="request bytes all connections may hold at once, 503 beyond "
                     "(default 64)")
    lim.add_argument("--max-json-mb", type=float, metavar="MB", help="largest JSON body "
                     "(default: what one sample needs, 64 KiB + 48 bytes a number; send large "
                     "inputs as application/octet-stream)")
    sv.set_defaults(func=cmd_serve)

    lt = sub.add_parser("loadtest", help="replay a bursty trace against static and adaptive "
                        "serving", description="On loopback and bounded in time: a Poisson "
                        "trace (base 0.6x, bursts 1.4x the INT8 capacity from the module's "
                        "latency profile, 30 %% of the time; bursts halfway between the INT8 "
                        "and the fastest ratio's capacity where those are less than 1.4x "
                        "apart) against static ratio 0, static "
                        "ratio 1 and the adaptive policy; p50/p99, SLO attainment, throughput, "
                        "mean accuracy, and a PNG plot.")
    lt.add_argument("--trace", default="bursty", help="trace kind (bursty)")
    lt.add_argument("--duration", type=float, default=30.0, help="seconds per configuration")
    lt.add_argument("--artifact", help="serve this artifact (its metadata gives accuracy)")
    lt.add_argument("--model", default="resnet20_fmnist",
                    choices=_fmnist_models(),
                    help="else compile this zoo model (default resnet20_fmnist)")
    lt.add_argument("--selection", default="static",
                    choices=("static", "greedy", "evolutionary"))
    lt.add_argument("--accuracy-images", type=int, default=1000,
                    help="test images for the per-ratio accuracy (zoo model)")
    lt.add_argument("--slo-ms", type=float, help="default: 2x the INT8 p50 at the base rate")
    lt.add_argument("--threads", type=int, help="TVM threads of the server's inference worker "
                    "(default: every CPU but one); the profile sizing the trace uses the same")
    _add_isa_arg(lt)
    lt.add_argument("--plot", metavar="PNG", help="write the load / ratio / latency plot here")
    lt.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    lt.set_defaults(func=cmd_loadtest)

    f = sub.add_parser("finetune", help="quantization-aware finetuning for every ratio at once",
                       description="Finetune a zoo model under its FlexiQ plan "
                       "(straight-through estimator, one ratio sampled per step, distillation "
                       "from FP32; nested channel sets fixed), commit the finetuned checkpoint "
                       "and plan, and print PTQ vs finetuned top-1 at every ratio. "
                       "Fashion-MNIST models train on the labelled training split; "
                       "EfficientNet-Lite0 is distilled on augmented views (random crops, "
                       "flips, colour jitter, mixup) of its calibration photos.")
    f.add_argument("--model", required=True,
                   choices=[*_fmnist_models(), "efficientnet_lite0_imagenet"])
    f.add_argument("--epochs", type=float, default=1.0,
                   help="passes over the data (default 1; Fashion-MNIST)")
    f.add_argument("--steps", type=int, default=None,
                   help="training steps, instead of epochs (needed for EfficientNet-Lite0, "
                   "which is distilled on augmented views of its calibration photos)")
    f.add_argument("--plan", metavar="PATH", help="start from this QuantPlan instead of "
                   "post-training selection")
    f.add_argument("--selection", default="greedy",
                   choices=("static", "greedy", "evolutionary"),
                   help="post-training selection of the starting plan (default greedy)")
    f.add_argument("--lr", type=float, default=1e-4, help="AdamW peak lr, cosine (default 1e-4)")
    f.add_argument("--batch-size", type=int, default=64)
    f.add_argument("--alpha", type=float, default=0.7,
                   help="distillation weight against cross-entropy (default 0.7)")
    f.add_argument("--train-images", type=int, default=None,
                   help="train on a seeded subset of N training images (default all 60000)")
    f.add_argument("--learn-act-scale", action="store_true",
                   help="also learn each layer's activation scale (clipping range)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    f.add_argument("--limit", type=int, default=2000, help="test images evaluated (default 2000)")
    f.add_argument("--no-save", action="store_true", help="do not write the checkpoint")
    f.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    f.set_defaults(func=cmd_finetune)

    tu = sub.add_parser("tune", help="MetaSchedule-tune a zoo model's non-FlexiQ kernels",
                        description="Tune, with MetaSchedule and the XGBoost cost model, every "
                        "PrimFunc of the compiled model except the hand-scheduled FlexiQ kernels "
                        "(FP32 glue, pooling, norms, attention matmuls). Records go to a JSON "
                        "database (default schedules/llvm/tuned) that `compile` applies. With "
                        "--rpc-tracker, candidates run on the devices registered under --rpc-key.")
    tu.add_argument("--model", required=True, choices=_models())
    tu.add_argument("--target", default="llvm", choices=("llvm", "cuda"))
    tu.add_argument("--arch", help="CUDA architecture for --target cuda (e.g. sm_80, sm_90)")
    tu.add_argument("--trials", type=int, default=64, help="measured candidates (default 64)")
    tu.add_argument("--trials-per-task", type=int, default=None)
    tu.add_argument("--work-dir", default=None,
                    help="database directory (default schedules/<target>/tuned)")
    tu.add_argument("--rpc-tracker", metavar="HOST:PORT",
                    help="measure on remote machines through this TVM RPC tracker")
    tu.add_argument("--rpc-key", metavar="KEY", help="device key the RPC servers registered")
    tu.add_argument("--json", metavar="PATH", help="write the summary as JSON here")
    tu.set_defaults(func=cmd_tune)

    d = sub.add_parser("demo", help="the main job: five ratios of one model, their accuracy "
                       "and latency beside torch and onnxruntime, and adaptive serving",
                       description="Compile the shipped ResNet-20 for five low-bit ratios; "
                       "print top-1 and batch-1 / batch-32 latency per ratio beside torch FP32 "
                       "and onnxruntime INT8 measured in the same run; replay a bursty load "
                       "against static and adaptive serving and plot it.")
    d.add_argument("--duration", type=float, default=6.0,
                   help="seconds of load per serving policy (default 6)")
    d.add_argument("--out-dir", default="demo_out",
                   help="where the artifact and the plot go (default demo_out)")
    d.set_defaults(func=cmd_demo)
    return p


def _add_isa_arg(p, many: bool = False) -> None:
    p.add_argument("--isa", help=("comma list of " if many else "") + "CPU kernel ISA"
                   + ("s to build FlexiQ for" if many else "") + ": avx2, avxvnni, avx512vnni "
                   "(default: " + ("this CPU's best, and avx2 beside it" if many else
                                   "the fastest this CPU has") + ")")


@contextlib.contextmanager
def _isa_override(args):
    """``--isa`` checked against this CPU; a single one is ``FLEXIQ_ISA`` for every compile of
    the command (bench takes its list itself), and the variable is as it was afterwards."""
    from . import hostcpu

    value = getattr(args, "isa", None)
    if not value:
        yield
        return
    isas = [hostcpu.check_isa(v) for v in value.split(",") if v.strip()]
    if not isas:
        raise ValueError(f"--isa {value!r}: no ISA given")
    if len(isas) > 1 and args.command != "bench":
        raise ValueError(f"--isa {value}: one ISA here (bench takes a list)")
    args.isa = isas
    before = os.environ.get("FLEXIQ_ISA")
    os.environ["FLEXIQ_ISA"] = isas[0]
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("FLEXIQ_ISA", None)
        else:
            os.environ["FLEXIQ_ISA"] = before


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:  # also TVM's benign native warnings (flexiq_tvm._quiet), here and in
        os.environ["FLEXIQ_VERBOSE"] = "1"  # the processes this one starts
    from .runtime import ArtifactError
    from .zoo.data import DataUnavailableError

    try:
        with _isa_override(args):
            return args.func(args)
    except (DataUnavailableError, ArtifactError, FileNotFoundError, IsADirectoryError,
            NotADirectoryError, PermissionError, ValueError, ImportError) as e:
        if args.verbose:
            raise
        print(f"flexiq-tvm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
