"""Real data, installed offline from packages (see ../shared/DATA.md).

* Fashion-MNIST: the IDX files of the Debian package ``dataset-fashion-mnist``.
* Natural images for the ImageNet model: the 20 labelled ImageNet photos shipped in ``foolbox``
  plus unlabelled photos from ``scikit-image`` (``skimage/data``) and, when installed, Debian's
  ``opencv-doc`` examples.  :func:`natural_image_split` splits them *by source file* into a
  calibration part and a held-out evaluation part that never share a photo; the evaluation part
  is expanded into several deterministic crops/flips per photo so that fidelity figures rest on
  more than a hundred views.

Everything returns numpy arrays (``float32`` NCHW, already normalized the way the models expect);
nothing is downloaded.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FMNIST_DIR_ENV = "FLEXIQ_FMNIST_DIR"
FMNIST_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530
FMNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}


class DataUnavailableError(RuntimeError):
    """A data package is not installed; the message says which command installs it."""


def fmnist_dir() -> Path:
    return Path(os.environ.get(FMNIST_DIR_ENV, FMNIST_DEFAULT_DIR))


def _read_idx(path: Path, magic: int, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise ValueError(f"{path}: IDX magic {got:#x}, expected {magic:#x}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header)


def load_fmnist_raw(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 (N, 28, 28), labels int64 (N,))`` of Fashion-MNIST ``split``."""
    if split not in _FILES:
        raise ValueError(f"split={split!r}; allowed: {sorted(_FILES)}")
    img_name, lbl_name, n = _FILES[split]
    root = fmnist_dir()
    if not (root / img_name).exists():
        raise DataUnavailableError(
            f"Fashion-MNIST not found in {root}: run `sudo apt-get install -y "
            f"dataset-fashion-mnist` (or set {FMNIST_DIR_ENV})"
        )
    images = _read_idx(root / img_name, 0x00000803, 16).reshape(n, 28, 28)
    labels = _read_idx(root / lbl_name, 0x00000801, 8).astype(np.int64)
    if labels.shape != (n,):
        raise ValueError(f"{root / lbl_name}: {labels.shape[0]} labels, expected {n}")
    return images, labels


def normalize_fmnist(images_u8: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28), normalized with the training-set stats."""
    x = images_u8.astype(np.float32)[:, None] / 255.0
    return (x - FMNIST_MEAN) / FMNIST_STD


def load_fmnist(split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Normalized Fashion-MNIST ``(x float32 (N, 1, 28, 28), y int64 (N,))``.

    ``limit`` takes the first N images (the test set is class-balanced throughout).
    """
    images, labels = load_fmnist_raw(split)
    if limit is not None:
        if limit <= 0:
            raise ValueError(f"limit={limit}; must be a positive number of images")
        images, labels = images[:limit], labels[:limit]
    return normalize_fmnist(images), labels


def fmnist_calibration(n: int = 256, seed: int = 0) -> np.ndarray:
    """``n`` calibration images drawn (seeded) from the *training* split, never the test set."""
    images, _ = load_fmnist_raw("train")
    idx = np.random.default_rng(seed).choice(len(images), size=n, replace=False)
    return normalize_fmnist(images[np.sort(idx)])


# --------------------------------------------------------------------------------------------
# Natural images (ImageNet-like)
# --------------------------------------------------------------------------------------------

IMAGENET_SIZE = 224


@dataclass(frozen=True)
class Photo:
    """One source photo: its path, ImageNet label (``-1`` when unlabelled) and origin."""

    path: Path
    label: int
    source: str


def _foolbox_photos() -> list[Photo]:
    # locate the package without importing it (its import needs eagerpy, not installed)
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(next(iter(spec.submodule_search_locations))) / "data"
    out = []
    for p in sorted(root.glob("imagenet_*.jpg")):
        # imagenet_NN_<label>.jpg
        out.append(Photo(p, int(p.stem.split("_")[-1]), "foolbox"))
    return out


#: the natural RGB photographs among scikit-image's sample data (the rest are charts, text,
#: grayscale or synthetic images)
SKIMAGE_PHOTOS = (
    "astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
    "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg",
)  # fmt: skip


def _skimage_photos() -> list[Photo]:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(next(iter(spec.submodule_search_locations))) / "data"
    return [Photo(root / n, -1, "skimage") for n in SKIMAGE_PHOTOS if (root / n).exists()]


OPENCV_DOC_DIR = Path("/usr/share/doc/opencv-doc/examples/data")


def _opencv_photos() -> list[Photo]:
    if not OPENCV_DOC_DIR.is_dir():
        return []
    return [Photo(p, -1, "opencv-doc") for p in sorted(OPENCV_DOC_DIR.glob("*.jpg"))]


def _is_natural_rgb(path: Path, min_side: int = 128) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.mode in ("RGB", "RGBA", "P", "L") and min(im.size) >= min_side and (
                im.mode != "L"
            )
    except Exception:
        return False


def natural_photos() -> list[Photo]:
    """All natural RGB photos available offline, in a fixed order (labelled ones first)."""
    photos = _foolbox_photos()
    if not photos:
        raise DataUnavailableError(
            "foolbox's ImageNet samples are missing: run `pip install --no-deps foolbox==3.3.4`"
        )
    for p in _skimage_photos() + _opencv_photos():
        if _is_natural_rgb(p.path):
            photos.append(p)
    return photos


def _hash_unit(path: Path) -> float:
    """Deterministic number in [0, 1) from a file name (independent of the install path)."""
    h = hashlib.sha256(f"{path.parent.name}/{path.name}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


@dataclass(frozen=True)
class NaturalSplit:
    calibration: list[Photo]
    evaluation: list[Photo]


def natural_image_split(calib_fraction: float = 0.5) -> NaturalSplit:
    """Split the photos into calibration and evaluation parts by file (no photo in both).

    The split hashes each file name, so it does not depend on which optional packages are
    installed; labelled foolbox photos are split the same way (about half go to evaluation).
    """
    if not 0.0 < calib_fraction < 1.0:
        raise ValueError(f"calib_fraction={calib_fraction}; must be in (0, 1)")
    calib, evl = [], []
    for p in natural_photos():
        (calib if _hash_unit(p.path) < calib_fraction else evl).append(p)
    return NaturalSplit(calib, evl)


def preprocess_imagenet(
    img, crop: int = IMAGENET_SIZE, resize: int = 256, offset: tuple[float, float] = (0.5, 0.5),
    flip: bool = False,
) -> np.ndarray:
    """EfficientNet-Lite preprocessing: bicubic resize (short side), crop, ``(x*255-127)/128``.

    ``offset`` places the crop window (fractions of the free margin; 0.5 = center crop).
    Returns float32 (3, crop, crop).
    """
    from PIL import Image

    img = img.convert("RGB")
    w, h = img.size
    s = resize / min(w, h)
    img = img.resize((max(crop, round(w * s)), max(crop, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left = round((w - crop) * offset[0])
    top = round((h - crop) * offset[1])
    img = img.crop((left, top, left + crop, top + crop))
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return normalize_imagenet(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0)


def normalize_imagenet(x: np.ndarray) -> np.ndarray:
    """EfficientNet-Lite's input normalization of RGB values in [0, 1]: ``(x*255-127)/128``."""
    return (x * 255.0 - 127.0) / 128.0


#: deterministic views of a held-out photo: (resize, crop offset x, y, flip)
EVAL_VIEWS: tuple[tuple[int, float, float, bool], ...] = tuple(
    (resize, ox, oy, flip)
    for resize in (256, 288, 320, 384)
    for ox, oy in ((0.5, 0.5), (0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0))
    for flip in (False, True)
)


def load_natural(
    part: str, views: bool = True, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Images of one part of :func:`natural_image_split` as ``(x (N,3,224,224), labels (N,))``.

    With ``views`` every photo gives all :data:`EVAL_VIEWS` (crops at several scales, flips),
    else one center crop.  ``part="evaluation"`` is photo-major (a photo's views together);
    ``part="calibration"`` is view-major (the center crop of every photo first, then the next
    view of every photo, ...), so its first ``N`` images spread over all the photos.  Labels
    are ``-1`` for unlabelled photos.  ``limit`` caps the number of returned images.
    """
    from PIL import Image

    photos = _part(part)
    vs = EVAL_VIEWS if views else ((256, 0.5, 0.5, False),)
    pairs = ([(i, v) for v in vs for i in range(len(photos))] if part == "calibration"
             else [(i, v) for i in range(len(photos)) for v in vs])
    if limit is not None:
        pairs = pairs[:limit]
    images = {}  # only the photos the views need
    for i in sorted({i for i, _ in pairs}):
        with Image.open(photos[i].path) as im:
            im.load()
            images[i] = im.copy()
    xs = [preprocess_imagenet(images[i], resize=r, offset=(ox, oy), flip=f)
          for i, (r, ox, oy, f) in pairs]
    return np.stack(xs), np.asarray([photos[i].label for i, _ in pairs], dtype=np.int64)


def load_photos(part: str) -> list:
    """The source photos of one part of :func:`natural_image_split` as RGB PIL images (for
    training-time augmentation; held-out photos are only ever evaluated)."""
    from PIL import Image

    out = []
    for p in _part(part):
        with Image.open(p.path) as im:
            out.append(im.convert("RGB"))
    return out


def _part(part: str) -> list[Photo]:
    if part not in ("calibration", "evaluation"):
        raise ValueError(f"part={part!r}; allowed: 'calibration', 'evaluation'")
    split = natural_image_split()
    return split.calibration if part == "calibration" else split.evaluation
