"""Built-in sources (digits, Olivetti, LFW), held-out identity splits."""
from __future__ import annotations

import urllib.error

import joblib
import numpy as np
import pytest
from PIL import Image

from siamkit.data.sources import default_preprocess, load_folder, load_source, split_identities
from siamkit.errors import SiamkitError


def test_digits_load_offline():
    ds = load_source("digits", default_preprocess("digits"))
    assert len(ds) == 1797 and ds.n_identities == 10
    assert ds.images.shape == (1797, 3, 32, 32) and ds.images.dtype.__str__() == "torch.uint8"
    assert ds.images.max() == 255  # 0..16 scaled to the full 8-bit range


def test_olivetti_reads_scikit_learns_cache(att_faces, tmp_path):
    """Lay out scikit-learn's own cache file from the AT&T faces (the same 400 images), then fetch it."""
    faces = []
    for person in range(1, 41):
        for i in range(1, 11):
            img = Image.open(att_faces / f"s{person}" / f"{i}.pgm").resize((64, 64))
            faces.append(np.asarray(img, dtype=np.float32).T.reshape(-1))  # the .mat layout sklearn transposes
    joblib.dump(np.stack(faces), tmp_path / "olivetti_py3.pkz", compress=3)
    ds = load_source("olivetti", default_preprocess("olivetti"), data_home=str(tmp_path))
    assert len(ds) == 400 and ds.n_identities == 40
    assert np.bincount(ds.labels).tolist() == [10] * 40
    # The first image is s1/1.pgm at 64x64, up to sklearn's min-max scaling and our rounding.
    ref = np.asarray(Image.open(att_faces / "s1" / "1.pgm").resize((64, 64)), dtype=np.float64)
    got = ds.images[0, 0].numpy().astype(np.float64)
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.999


def test_olivetti_offline_fails_with_one_clear_line(monkeypatch, tmp_path):
    import sklearn.datasets

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(sklearn.datasets, "fetch_olivetti_faces", offline)
    with pytest.raises(SiamkitError) as e:
        load_source("olivetti", default_preprocess("olivetti"), data_home=str(tmp_path))
    assert "connect to the internet" in str(e.value) and "--data" in str(e.value) and "\n" not in str(e.value)


def test_lfw_offline_fails_with_one_clear_line(monkeypatch):
    import sklearn.datasets

    monkeypatch.setattr(sklearn.datasets, "fetch_lfw_people", lambda **kw: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(SiamkitError, match="could not get LFW.*lfw folder"):
        load_source("lfw", default_preprocess("lfw"))


def test_folder_greyscale_and_rgb(att_faces, data_root):
    pre = default_preprocess("folder", image_size=(40, 32), grayscale=True)
    ds = load_folder(att_faces, pre)
    assert len(ds) == 400 and ds.images.shape == (400, 1, 40, 32)
    assert ds.names[:3] == ["s1", "s10", "s11"]  # sorted names; labels follow them
    rgb = load_folder(att_faces, default_preprocess("folder"))
    assert rgb.images.shape == (400, 3, 64, 64)
    assert (rgb.images[:, 0] == rgb.images[:, 1]).all()  # greyscale PGM repeated on three channels


def test_split_holds_out_whole_identities(att_faces):
    ds = load_folder(att_faces, default_preprocess("folder", image_size=(16, 16)))
    train, val = split_identities(ds, 0.25, seed=3)
    assert val.n_identities == 10 and train.n_identities == 30
    assert not set(train.names) & set(val.names)
    assert len(train) + len(val) == 400
    again_train, _ = split_identities(ds, 0.25, seed=3)
    assert again_train.names == train.names
    _, val_count = split_identities(ds, 4, seed=3)
    assert val_count.n_identities == 4
    # labels are renumbered 0..n-1 and still match their images' folders
    for i in (0, 57, len(val) - 1):
        assert val.paths[i].split("/")[0] == val.names[val.labels[i]]


def test_packaged_att_faces_equal_the_original_files_pixel_for_pixel(att_faces):
    """The built-in faces (one PNG grid in the package) against Pillow's decoding of the 400 original PGMs."""
    import numpy as np
    from PIL import Image

    from siamkit.data.sources import load_att_faces
    from siamkit.data.transforms import Preprocess

    native = Preprocess(image_size=(112, 92), channels=1, mean=(0.5,), std=(0.5,))  # no resize: exact pixels
    ds = load_att_faces(native)
    assert ds.images.shape == (400, 1, 112, 92) and ds.names == [f"s{i}" for i in range(1, 41)]
    for img, label, path in zip(ds.images, ds.labels, ds.paths):
        original = np.asarray(Image.open(att_faces / path))
        assert path.split("/")[0] == ds.names[label]
        assert np.array_equal(img[0].numpy(), original), path


def test_att_train_and_test_are_the_readme_split():
    from siamkit.data.sources import default_preprocess, load_source

    train, test = (load_source(name, default_preprocess(name)) for name in ("att-train", "att-test"))
    assert train.names == [f"s{i}" for i in range(1, 31)] and test.names == [f"s{i}" for i in range(31, 41)]
    assert len(train) == 300 and len(test) == 100 and train.images.shape[1] == 1  # greyscale by default
