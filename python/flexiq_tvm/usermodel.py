"""A user's model from its file to a served artifact: what ``flexiq-tvm compile MODEL --calib
DATA --out model.flexiq`` does.

MODEL is an ONNX file, a saved ``torch.export`` program (``.pt2``) or a zoo name. Calibration
data is a folder of images (resized and center-cropped as torchvision users expect, then
normalized with ``mean`` / ``std``) or a ``.npy`` / ``.npz`` array of preprocessed samples.
Everything a user can get wrong is checked before the work starts and reported in one line
(:class:`ValueError` / :class:`FileNotFoundError`): the CLI prints it and exits 2.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".gif", ".webp", ".tif",
                  ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_output(path) -> Path:
    """``path`` as the artifact's destination, refused now (before any work) if it cannot be
    written: a directory, a missing or unwritable folder."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--out {path}: is a directory; give a file name, e.g. model.flexiq")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"--out {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"--out {path}: not writable")
    return path


def parse_floats(text: str | None, name: str) -> tuple[float, ...] | None:
    """``"0.485,0.456,0.406"`` (one number per channel, or one for all) -> floats."""
    if text is None:
        return None
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--{name} {text!r}: expected numbers separated by commas") from None
    if not all(np.isfinite(vals)) or (name == "std" and min(vals) <= 0):
        raise ValueError(f"--{name} {text!r}: expected finite numbers"
                         + (" above 0" if name == "std" else ""))
    return vals


def load_source(path):
    """``(kind, model)`` of a model file: ``("onnx", ModelProto)`` or ``("pt2", module)``,
    validated (one clear line for a missing, unreadable, malformed or unsupported file)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such model file: {path}")
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, not a model file")
    if path.suffix == ".pt2":
        from . import pt2_torch

        return "pt2", pt2_torch.load(path)
    if path.suffix != ".onnx":
        raise ValueError(f"{path}: expected an .onnx or .pt2 file (or a zoo model name)")
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load(str(path))
    except (DecodeError, ValueError, OSError, RuntimeError) as e:
        raise ValueError(f"{path}: not a readable ONNX model ({type(e).__name__}: "
                         f"{str(e)[:160]})") from None
    if not proto.graph.node:
        raise ValueError(f"{path}: not an ONNX model (its graph has no nodes; truncated?)")
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: malformed ONNX model ({first[:200]})") from None
    from .onnx_torch import check_supported

    try:
        check_supported(proto)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return "onnx", proto


def input_shape(kind: str, model, batch: int = 1, input_size: tuple[int, int] | None = None,
                channels: int | None = None, data_size: tuple[int, int] | None = None
                ) -> tuple[int, ...]:
    """The example input's shape: the model's declared input, its dynamic axes filled from
    ``batch`` (the batch axis), ``input_size`` (H, W; else the calibration arrays'
    ``data_size``) and ``channels``."""
    if kind == "onnx":
        init = {i.name for i in model.graph.initializer}
        inputs = [i for i in model.graph.input if i.name not in init]
        if len(inputs) != 1:
            raise ValueError(f"the model takes {len(inputs)} inputs; the CLI compiles "
                             "single-input models (use flexiq_tvm.compile for more)")
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                for d in inputs[0].type.tensor_type.shape.dim]
    else:
        from .pt2_torch import static_batch

        users = [s for s in model.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
        if len(users) != 1:
            raise ValueError(f"the program takes {len(users)} inputs; the CLI compiles "
                             "single-input programs")
        node = next(n for n in model.graph.nodes if n.op == "placeholder"
                    and n.name == users[0].arg.name)
        dims = [d if isinstance(d, int) else None for d in node.meta["val"].shape]
        if static_batch(model) is not None:
            dims[0] = static_batch(model)
    if len(dims) != 4:
        raise ValueError(f"the model's input has shape {dims}; the CLI compiles image models "
                         "(N, C, H, W)")
    if dims[0] is None:
        dims[0] = batch
    elif dims[0] != batch and batch != 1:
        raise ValueError(f"the model is fixed to batch {dims[0]}; --batch {batch} differs")
    if dims[1] is None:
        if channels is None:
            raise ValueError("the model's channel axis is dynamic: give calibration arrays")
        dims[1] = channels
    if dims[2] is None or dims[3] is None:
        input_size = input_size or data_size
        if input_size is None:
            raise ValueError(f"the model's input {dims} has a dynamic size: give "
                             "--input-size H[,W]")
        dims[2], dims[3] = input_size
    elif input_size is not None and tuple(input_size) != (dims[2], dims[3]):
        raise ValueError(f"--input-size {input_size[0]},{input_size[1]}: the model takes "
                         f"{dims[2]}x{dims[3]}")
    return tuple(int(d) for d in dims)


def load_calibration(path, sample_shape: tuple[int, int, int] | None, limit: int = 256,
                     mean=None, std=None, resize: int | None = None) -> np.ndarray:
    """Calibration samples ``(N, C, H, W)`` float32 from a folder of images or an array file.

    Images (sorted by name, the first ``limit``): converted to RGB (or grey for one channel),
    the short side resized to ``resize`` (default ``round(H / 0.875)``, torchvision's 256 for
    224) with bilinear filtering, center-cropped to ``H x W``, scaled to [0, 1] and normalized
    ``(x - mean) / std`` (default: ImageNet's for 3 channels, none for others). Arrays are
    taken as they are (already preprocessed)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such calibration data: {path}")
    if path.is_dir():
        if sample_shape is None:
            raise ValueError("calibration images need the model's input size (--input-size)")
        return _images(path, sample_shape, limit, mean, std, resize)
    if path.suffix not in (".npy", ".npz"):
        raise ValueError(f"--calib {path}: expected a folder of images or a .npy / .npz array")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"--calib {path}: not a readable numpy array ({e})") from None
    if isinstance(arr, np.lib.npyio.NpzFile):
        keys = list(arr.files)
        key = next((k for k in ("x", "calib", "images", "data") if k in keys),
                   keys[0] if len(keys) == 1 else None)
        if key is None:
            raise ValueError(f"--calib {path}: holds arrays {keys}; name the samples 'x'")
        arr = arr[key]
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"--calib {path}: dtype {arr.dtype}; expected numbers")
    return np.ascontiguousarray(arr[:limit], np.float32)


def _images(folder: Path, shape, limit, mean, std, resize) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    c, h, w = shape
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"--calib {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in it")
    if c not in (1, 3):
        raise ValueError(f"the model takes {c} channels; images give 1 or 3: pass a .npy array")
    mean = np.asarray(mean if mean is not None else (IMAGENET_MEAN if c == 3 else (0.0,)),
                      np.float32).reshape(-1, 1, 1)
    std = np.asarray(std if std is not None else (IMAGENET_STD if c == 3 else (1.0,)),
                     np.float32).reshape(-1, 1, 1)
    for name, v in (("mean", mean), ("std", std)):
        if len(v) not in (1, c):
            raise ValueError(f"--{name}: {len(v)} values for a model of {c} channels")
    resize = resize or round(min(h, w) / 0.875)
    out = []
    for f in files[:limit]:
        try:
            img = Image.open(f).convert("RGB" if c == 3 else "L")
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"--calib: cannot read image {f} ({e})") from None
        iw, ih = img.size
        s = resize / min(iw, ih)
        img = img.resize((max(w, round(iw * s)), max(h, round(ih * s))), Image.BILINEAR)
        iw, ih = img.size
        left, top = (iw - w) // 2, (ih - h) // 2
        x = np.asarray(img.crop((left, top, left + w, top + h)), np.float32) / 255.0
        x = x[None] if c == 1 else x.transpose(2, 0, 1)
        out.append((x - mean) / std)
    return np.stack(out).astype(np.float32)


def _fp32_reference(kind: str, model, x: np.ndarray) -> np.ndarray:
    """The FP32 outputs of the source model (onnxruntime for ONNX, torch for a .pt2 program
    or a zoo module), one sample at a time, flattened side by side (:func:`_flat`)."""
    if kind == "onnx":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(model.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return np.concatenate([_flat(sess.run(None, {name: x[i : i + 1]}))
                               for i in range(len(x))])
    import torch

    fn = model.module() if kind == "pt2" else model.eval()
    with torch.no_grad():
        return np.concatenate([_flat(fn(torch.from_numpy(x[i : i + 1])))
                               for i in range(len(x))])


def _flat(out) -> np.ndarray:
    """Every output of one sample, flattened side by side (several heads compare as one)."""
    outs = out if isinstance(out, tuple | list) else (out,)
    return np.concatenate([np.asarray(o, np.float32).reshape(1, -1) for o in outs], 1)


def sqnr_db(ref: np.ndarray, y: np.ndarray) -> float:
    err = float(((y - ref) ** 2).sum())
    return float("inf") if err == 0 else 10 * np.log10(float((ref ** 2).sum()) / err)


def compile_to_artifact(source: str, calib: str, out, ratios, selection: str = "static",
                        target="llvm", batch: int = 1, input_size=None, mean=None, std=None,
                        resize=None, calib_images: int = 256, key: bytes | None = None,
                        progress: bool = True, reconstruct: bool = False) -> dict:
    """Compile ``source`` (``.onnx`` / ``.pt2`` path or zoo name) with calibration data
    ``calib`` and write the artifact ``out``. Returns the summary (rows per ratio, times)."""
    import flexiq_tvm

    from .config import FlexiQConfig
    from .zoo import registry

    out = check_output(out)
    cfg = FlexiQConfig(ratios=tuple(ratios), selection=selection, calib_images=calib_images,
                       reconstruct=reconstruct)
    t_start = time.perf_counter()
    if source in registry.MODELS:
        from .eval import load_calibration as zoo_calibration

        model = registry.get_model(source)
        kind, src = "zoo", model
        shape = (batch, *registry.spec(source).input_shape)
        data = (load_calibration(calib, shape[1:], calib_images, mean, std, resize) if calib
                else zoo_calibration(source, calib_images))
    else:
        kind, src = load_source(source)
        if calib is None:
            raise ValueError("--calib is required: a folder of images or a .npy / .npz array "
                             "of preprocessed samples")
        channels = None
        if Path(calib).suffix in (".npy", ".npz"):
            data = load_calibration(calib, None, calib_images)
            channels = data.shape[1] if data.ndim == 4 else None
            size = tuple(data.shape[2:]) if data.ndim == 4 else None
            shape = input_shape(kind, src, batch, input_size, channels, size)
        else:
            shape = input_shape(kind, src, batch, input_size)
            data = load_calibration(calib, shape[1:], calib_images, mean, std, resize)
        model = source
    example = np.zeros(shape, np.float32)  # compile checks the calibration data against it
    log.info("compiling %s (input %s) on %d calibration samples", source, shape, len(data))
    cm = flexiq_tvm.compile(model, example, data, target=target, config=cfg,
                            progress=progress)
    t_compile = time.perf_counter() - t_start
    check = data[: min(16, len(data))]
    # the module runs one sample at a time only when compiled for batch 1
    ref = _fp32_reference(kind, src, check) if shape[0] == 1 else None
    cm.export(out, key=key)
    rows = []
    kept = list(cm.report.kept_fp32)
    for r in cm.ratios:
        row = {"ratio": r, "mac_4bit": cm.plan.mac_fraction(r, eligible_only=False),
               "covered": len(cm.report.covered), "fp32_ops": len(kept)}
        if ref is not None:
            y = np.concatenate([_flat(cm(check[i : i + 1], ratio=r))
                                for i in range(len(check))])
            row["sqnr_db"] = sqnr_db(ref, y)
        rows.append(row)
    return {"source": str(source), "artifact": str(out), "input_shape": list(shape),
            "calibration_samples": len(data), "compile_s": t_compile, "rows": rows,
            "kept_fp32": kept, "profile_ms": cm.metadata.get("profile_ms")}


def print_summary(doc: dict) -> None:
    print(f"{doc['source']} -> {doc['artifact']}  input {tuple(doc['input_shape'])}, "
          f"{doc['calibration_samples']} calibration samples, compiled in "
          f"{doc['compile_s']:.1f} s")
    print(f"  {'ratio':>5}  {'4-bit MACs':>10}  {'covered':>7}  {'FP32 ops':>8}  "
          f"{'SQNR vs FP32':>12}")
    for r in doc["rows"]:
        sq = f"{r['sqnr_db']:.1f} dB" if "sqnr_db" in r else "-"
        print(f"  {r['ratio']:>5g}  {100 * r['mac_4bit']:>9.1f}%  {r['covered']:>7d}  "
              f"{r['fp32_ops']:>8d}  {sq:>12}")
    for k in doc["kept_fp32"]:
        print(f"  left in FP32: {k['op']} ({k['reason']})")
    print(f"serve it: flexiq-tvm serve {doc['artifact']} --slo-ms 10")
