import gzip

import numpy as np
import pytest
from PIL import Image

from flexiq_tvm.zoo import data


def test_fmnist_splits_shapes_and_balance():
    xtr, ytr = data.load_fmnist_raw("train")
    xte, yte = data.load_fmnist_raw("test")
    assert xtr.shape == (60000, 28, 28) and xte.shape == (10000, 28, 28)
    assert xtr.dtype == np.uint8
    # Fashion-MNIST is balanced: 6000 / 1000 images per class
    assert np.bincount(ytr).tolist() == [6000] * 10
    assert np.bincount(yte).tolist() == [1000] * 10


def test_fmnist_normalization_matches_training_stats():
    x, _ = data.load_fmnist("train")
    assert x.shape == (60000, 1, 28, 28) and x.dtype == np.float32
    assert abs(float(x.mean())) < 1e-3
    assert abs(float(x.std()) - 1.0) < 1e-3


def test_fmnist_limit_and_bad_arguments():
    x, y = data.load_fmnist("test", limit=7)
    assert x.shape == (7, 1, 28, 28) and y.shape == (7,)
    with pytest.raises(ValueError, match="split='val'"):
        data.load_fmnist_raw("val")
    with pytest.raises(ValueError, match="limit=0"):
        data.load_fmnist("test", limit=0)


def test_fmnist_missing_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setenv(data.FMNIST_DIR_ENV, str(tmp_path))
    with pytest.raises(data.DataUnavailableError, match=r"apt-get install -y dataset-fashion"):
        data.load_fmnist_raw("test")


def test_fmnist_bad_magic_is_refused(tmp_path, monkeypatch):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(b"\x00\x00\x08\x01" + bytes(100))
    monkeypatch.setenv(data.FMNIST_DIR_ENV, str(tmp_path))
    with pytest.raises(ValueError, match="IDX magic 0x801, expected 0x803"):
        data.load_fmnist_raw("test")


def test_fmnist_calibration_comes_from_train_split_and_is_seeded():
    a = data.fmnist_calibration(64, seed=3)
    b = data.fmnist_calibration(64, seed=3)
    c = data.fmnist_calibration(64, seed=4)
    assert a.shape == (64, 1, 28, 28)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    train, _ = data.load_fmnist("train")
    test, _ = data.load_fmnist("test")
    train_rows = {r.tobytes() for r in train.reshape(60000, -1)}
    test_rows = {r.tobytes() for r in test.reshape(10000, -1)}
    calib_rows = {r.tobytes() for r in a.reshape(64, -1)}
    assert calib_rows <= train_rows
    # FMNIST holds a few exact duplicates across splits; the draw must not rely on them
    assert len(calib_rows & test_rows) <= 1


def test_natural_split_is_disjoint_deterministic_and_labelled():
    s1, s2 = data.natural_image_split(), data.natural_image_split()
    cal = {p.path for p in s1.calibration}
    ev = {p.path for p in s1.evaluation}
    assert cal and ev and not (cal & ev)
    assert [p.path for p in s1.evaluation] == [p.path for p in s2.evaluation]
    labelled = [p for p in s1.calibration + s1.evaluation if p.label >= 0]
    assert len(labelled) == 20  # all foolbox ImageNet samples
    assert any(p.label >= 0 for p in s1.evaluation)
    assert any(p.label >= 0 for p in s1.calibration)
    with pytest.raises(ValueError, match=r"calib_fraction=1\.5"):
        data.natural_image_split(1.5)


def test_natural_views_preprocessing():
    x, y = data.load_natural("evaluation", limit=len(data.EVAL_VIEWS) + 3)
    assert x.shape == (len(data.EVAL_VIEWS) + 3, 3, 224, 224) and x.dtype == np.float32
    # (x*255 - 127) / 128 keeps values in [-127/128, 1]
    assert x.min() >= -127 / 128 - 1e-6 and x.max() <= 1.0 + 1e-6
    # all views of the first photo share its label, and the views differ from each other
    assert len(set(y[: len(data.EVAL_VIEWS)].tolist())) == 1
    assert len({v.tobytes() for v in x[: len(data.EVAL_VIEWS)]}) == len(data.EVAL_VIEWS)
    # calibration is view-major: every photo's center crop, then every photo's next view
    n = len(data.natural_image_split().calibration)
    xc, _ = data.load_natural("calibration", limit=n + 2)
    center, _ = data.load_natural("calibration", views=False)
    assert xc.shape == (n + 2, 3, 224, 224) and np.array_equal(xc[:n], center)
    assert not np.array_equal(xc[n], center[0])
    resize, ox, oy, flip = data.EVAL_VIEWS[1]
    with Image.open(data.natural_image_split().calibration[0].path) as im:
        want = data.preprocess_imagenet(im, resize=resize, offset=(ox, oy), flip=flip)
    assert np.array_equal(xc[n], want)
    with pytest.raises(ValueError, match="part='test'"):
        data.load_natural("test")
