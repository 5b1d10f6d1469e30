"""The image datasets that are read from files: CIFAR-10/100 in their official formats (from
small fixture archives), a user's image folder, and the cache / download path of fetch.py
(with file:// URLs, so no network)."""

import dataclasses
import hashlib
import io
import os
import pickle

import numpy as np
import pytest
import torch

from diffusionblocks.errors import ConfigError
from diffusionblocks.tasks.data import cifar, fetch, fixtures, image_folder, images


@pytest.fixture(scope="module")
def cifar10_archive(tmp_path_factory):
    return fixtures.write_cifar10(tmp_path_factory.mktemp("c10") / "cifar-10-python.tar.gz", train=120, test=30)


@pytest.fixture(scope="module")
def cifar100_archive(tmp_path_factory):
    return fixtures.write_cifar100(tmp_path_factory.mktemp("c100") / "cifar-100-python.tar.gz", train=300, test=100)


def assert_same(a: images.Images, b: images.Images):
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert (a.num_classes, a.class_names, a.name) == (b.num_classes, b.class_names, b.name)


# --- CIFAR ---------------------------------------------------------------------------------

def test_cifar10_archive_shapes_dtypes_labels(cifar10_archive):
    data = cifar.load("cifar10", str(cifar10_archive))
    assert data.train_images.shape == (120, 3, 32, 32) and data.test_images.shape == (30, 3, 32, 32)
    assert data.train_images.dtype == torch.uint8 and data.train_labels.dtype == torch.int64
    assert data.test_labels.dtype == torch.int64 and data.train_labels.shape == (120,)
    assert data.num_classes == 10 and data.pixel_max == 255 and data.mirror_symmetric
    assert data.name == "CIFAR-10" and data.class_names[0] == "airplane" and data.class_names[-1] == "truck"
    assert set(data.train_labels.tolist()) == set(range(10))  # every class present
    assert (data.image_size, data.channels) == (32, 3)


def test_cifar10_pixel_layout_matches_the_official_rows(tmp_path):
    """Row i of data_batch_1 is image i: 1024 red values, then green, then blue, row-major."""
    folder = fixtures.write_cifar10(tmp_path, train=50, test=10, as_archive=False)
    with open(folder / "data_batch_1", "rb") as stream:
        batch = pickle.load(stream, encoding="bytes")
    data = cifar.load("cifar10", str(folder))
    row = batch[b"data"][3]
    assert torch.equal(data.train_images[3, 1, 2], torch.from_numpy(row[1024 + 2 * 32:1024 + 3 * 32]))
    assert data.train_labels[:10].tolist() == batch[b"labels"]


def test_cifar_archive_folder_and_parent_agree(tmp_path, cifar10_archive):
    folder = fixtures.write_cifar10(tmp_path, train=120, test=30, as_archive=False)
    assert folder.name == "cifar-10-batches-py"
    from_archive = cifar.load("cifar10", str(cifar10_archive))
    assert_same(from_archive, cifar.load("cifar10", str(folder)))
    assert_same(from_archive, cifar.load("cifar10", str(tmp_path)))


def test_cifar100_fine_and_coarse(cifar100_archive):
    fine = cifar.load("cifar100", str(cifar100_archive))
    coarse = cifar.load("cifar100", str(cifar100_archive), labels="coarse")
    assert (fine.num_classes, coarse.num_classes) == (100, 20)
    assert len(fine.class_names) == 100 and coarse.class_names[:2] == ["coarse_00", "coarse_01"]
    assert fine.train_images.shape == (300, 3, 32, 32) and fine.test_images.shape == (100, 3, 32, 32)
    assert torch.equal(fine.train_images, coarse.train_images)
    assert torch.equal(coarse.train_labels, fine.train_labels // 5)  # the fixture's fine -> coarse map
    assert 0 <= int(coarse.test_labels.min()) and int(coarse.test_labels.max()) < 20
    assert fine.name == "CIFAR-100"


def test_fixtures_are_deterministic(tmp_path):
    a = fixtures.write_cifar100(tmp_path / "a.tar.gz", train=20, test=5)
    b = fixtures.write_cifar100(tmp_path / "b.tar.gz", train=20, test=5)
    assert a.read_bytes() == b.read_bytes()
    assert fixtures.write_cifar100(tmp_path / "c.tar.gz", train=20, test=5, seed=1).read_bytes() != a.read_bytes()


def test_cifar_bad_paths_and_arguments(tmp_path, cifar10_archive):
    with pytest.raises(ConfigError, match=r"^model\.data: .*holds no CIFAR-10 files.*data_batch_1"):
        cifar.load("cifar10", str(tmp_path))
    (tmp_path / "not.tar.gz").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match=r"^model\.data: .*not a readable tar archive"):
        cifar.load("cifar10", str(tmp_path / "not.tar.gz"))
    with pytest.raises(ConfigError, match=r"lacks .*cifar-100-python/train"):
        cifar.load("cifar100", str(cifar10_archive))  # the wrong archive
    with pytest.raises(ConfigError, match=r"^model\.labels:"):
        cifar.load("cifar10", str(cifar10_archive), labels="coarse")
    folder = fixtures.write_cifar10(tmp_path / "partial", train=20, test=5, as_archive=False)
    (folder / "data_batch_3").unlink()
    with pytest.raises(ConfigError, match=r"lacks data_batch_3"):
        cifar.load("cifar10", str(folder))


def test_cifar_malformed_files_are_refused(tmp_path):
    folder = fixtures.write_cifar10(tmp_path, train=20, test=5, as_archive=False)
    batch = {b"data": np.zeros((5, 3000), np.uint8), b"labels": [0] * 5}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(ConfigError, match=r"test_batch: expected uint8 data of shape \[N, 3072\]"):
        cifar.load("cifar10", str(folder))
    batch = {b"data": np.zeros((5, 3072), np.uint8), b"labels": [0, 1, 2, 3, 10]}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(ConfigError, match=r"labels must lie in 0\.\.9"):
        cifar.load("cifar10", str(folder))
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2)[:100])
    with pytest.raises(ConfigError, match=r"not a readable CIFAR pickle"):
        cifar.load("cifar10", str(folder))


class Malicious:
    def __init__(self, victim):
        self.victim = victim

    def __reduce__(self):
        return os.remove, (self.victim,)


def test_malicious_pickle_is_refused_not_run(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("still here")
    folder = fixtures.write_cifar10(tmp_path / "data", train=20, test=5, as_archive=False)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": Malicious(str(victim))}, protocol=2))
    with pytest.raises(ConfigError, match=r"refers to (posix|nt|os)\.(remove|unlink).*refusing"):
        cifar.load("cifar10", str(folder))
    assert victim.exists()
    with pytest.raises(ConfigError, match=r"refers to os\.system"):
        cifar.unpickle(io.BytesIO(b"cos\nsystem\n(S'echo pwned'\ntR."), "evil")
    with pytest.raises(ConfigError, match=r"encoding 'zlib'"):
        cifar.unpickle(io.BytesIO(b"c_codecs\nencode\n(X\x01\x00\x00\x00aX\x04\x00\x00\x00zlibtR."), "evil")


def test_python3_protocol2_bytes_load(tmp_path):
    """Python 3 at protocol 2 writes bytes as _codecs.encode(text, "latin1"), which is allowed."""
    folder = fixtures.write_cifar10(tmp_path, train=20, test=5, as_archive=False)
    with open(folder / "test_batch", "rb") as stream:
        batch = pickle.load(stream, encoding="bytes")
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    assert torch.equal(cifar.load("cifar10", str(folder)).test_labels, torch.tensor(batch[b"labels"]))


def test_numpy2_pickles_load_too(tmp_path):
    """A copy re-saved by Python 3 with numpy 2 (numpy._core, protocol 4) also loads."""
    folder = fixtures.write_cifar10(tmp_path, train=20, test=5, as_archive=False)
    with open(folder / "test_batch", "rb") as stream:
        batch = pickle.load(stream, encoding="bytes")
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=4))
    assert cifar.load("cifar10", str(folder)).test_images.shape == (5, 3, 32, 32)


# --- image folder --------------------------------------------------------------------------

def test_image_folder_held_out_split(tmp_path):
    root = fixtures.write_image_folder(tmp_path / "pets", classes=3, per_class=12)
    data = image_folder.load(str(root), 16)
    assert data.train_images.shape == (33, 3, 16, 16) and data.test_images.shape == (3, 3, 16, 16)
    assert data.train_images.dtype == torch.uint8 and data.train_labels.dtype == torch.int64
    assert data.test_labels.tolist() == [0, 1, 2]  # 12 // 10 = 1 per class
    assert data.class_names == ["class_00", "class_01", "class_02"] and data.name == "pets"
    assert data.num_classes == 3 and data.pixel_max == 255 and data.mirror_symmetric
    assert_same(data, image_folder.load(str(root), 16))  # deterministic
    # the class colours survive the resize: a class's images are near their own mean colour
    means = data.train_images.float().mean((2, 3))
    assert (means[data.train_labels == 0].std(0) < 10).all()


def test_image_folder_small_classes_and_sizes(tmp_path):
    root = fixtures.write_image_folder(tmp_path / "small", classes=2, per_class=2, size=(7, 50))
    data = image_folder.load(str(root), 24)
    assert data.train_images.shape == (2, 3, 24, 24) and data.test_images.shape == (2, 3, 24, 24)
    root = fixtures.write_image_folder(tmp_path / "many", classes=2, per_class=25)
    assert image_folder.load(str(root), 8).test_images.shape == (4, 3, 8, 8)  # 25 // 10 = 2 per class


def test_image_folder_explicit_split(tmp_path):
    root = fixtures.write_image_folder(tmp_path / "split", classes=4, per_class=5, split=True)
    data = image_folder.load(str(root), 12)
    assert data.train_images.shape == (20, 3, 12, 12) and data.test_images.shape == (4, 3, 12, 12)
    assert data.class_names == [f"class_{c:02d}" for c in range(4)]
    assert data.train_labels.tolist() == [c for c in range(4) for _ in range(5)]


def test_image_folder_greyscale_rule(tmp_path):
    root = fixtures.write_image_folder(tmp_path / "grey", classes=2, per_class=3, grey=True)
    assert image_folder.load(str(root), 10).channels == 1
    from PIL import Image

    Image.new("RGB", (9, 9), (200, 10, 10)).save(root / "class_00" / "red.png")  # one colour image: all RGB
    data = image_folder.load(str(root), 10)
    assert data.channels == 3
    grey = data.train_images[data.train_labels == 1]
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])


def test_image_folder_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^model\.data: no such folder"):
        image_folder.load(str(tmp_path / "absent"), 8)
    with pytest.raises(ConfigError, match=r"^model\.data: .*at least 2 class subfolders of images, found 0"):
        image_folder.load(str(tmp_path), 8)
    root = fixtures.write_image_folder(tmp_path / "one", classes=1, per_class=3)
    with pytest.raises(ConfigError, match=r"at least 2 class subfolders of images, found 1 \(class_00\)"):
        image_folder.load(str(root), 8)
    root = fixtures.write_image_folder(tmp_path / "empty", classes=2, per_class=3)
    (root / "class_02").mkdir()
    (root / "class_02" / "notes.txt").write_text("not an image")
    with pytest.raises(ConfigError, match=r"class_02 holds no images"):
        image_folder.load(str(root), 8)
    root = fixtures.write_image_folder(tmp_path / "broken", classes=2, per_class=3)
    (root / "class_01" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match=r"cannot read the image .*bad\.png"):
        image_folder.load(str(root), 8)
    root = fixtures.write_image_folder(tmp_path / "singles", classes=2, per_class=1)
    with pytest.raises(ConfigError, match=r"too few images to hold out a test set"):
        image_folder.load(str(root), 8)
    root = fixtures.write_image_folder(tmp_path / "mismatch", classes=2, per_class=3, split=True)
    (root / "test" / "class_01").rename(root / "test" / "class_09")
    with pytest.raises(ConfigError, match=r"same class subfolders"):
        image_folder.load(str(root), 8)


def test_images_load_dispatches_to_the_folder(tmp_path):
    root = fixtures.write_image_folder(tmp_path / "f", classes=2, per_class=4)
    data = images.load(images.ImageDataOptions(dataset="folder", data=str(root), image_size=8))
    assert data.train_images.shape[1:] == (3, 8, 8)


# --- fetch: cache, offline, checksum, download ----------------------------------------------

@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("DIFFUSIONBLOCKS_DATA", str(folder))
    monkeypatch.setenv("DIFFUSIONBLOCKS_OFFLINE", "1")
    return folder


def test_offline_and_absent_raises_data_missing(cache):
    with pytest.raises(fetch.DataMissing) as error:
        images.load(images.ImageDataOptions(dataset="cifar10"))
    message = str(error.value)
    assert message.startswith("model.data:") and fetch.SOURCES["cifar10"].url in message and str(cache) in message
    assert "\n" not in message


def test_wrong_file_in_cache_raises_checksum_error(cache):
    fixtures.write_cifar10(cache / "cifar-10-python.tar.gz", train=20, test=5)
    with pytest.raises(fetch.ChecksumError, match=r"^model\.data: .*delete it"):
        images.load(images.ImageDataOptions(dataset="cifar10"))
    assert not (cache / "cifar-10-python.tar.gz.verified").exists()


def test_download_lands_in_cache_is_verified_and_loads(tmp_path, cache, monkeypatch):
    archive = fixtures.write_cifar100(tmp_path / "upstream" / "cifar-100-python.tar.gz", train=100, test=20)
    source = dataclasses.replace(fetch.SOURCES["cifar100"], url=archive.as_uri(),
                                 digest=hashlib.md5(archive.read_bytes()).hexdigest())
    monkeypatch.setitem(fetch.SOURCES, "cifar100", source)
    monkeypatch.setenv("DIFFUSIONBLOCKS_OFFLINE", "0")
    data = images.load(images.ImageDataOptions(dataset="cifar100", labels="coarse"))
    cached = cache / "cifar-100-python.tar.gz"
    assert cached.read_bytes() == archive.read_bytes()
    assert (cache / "cifar-100-python.tar.gz.verified").exists()
    assert not (cache / "cifar-100-python.tar.gz.part").exists()
    assert data.num_classes == 20 and data.train_images.shape == (100, 3, 32, 32)
    assert_same(data, cifar.load("cifar100", str(archive), "coarse"))
    # the second time it is found in the cache, offline
    monkeypatch.setenv("DIFFUSIONBLOCKS_OFFLINE", "1")
    assert_same(data, images.load(images.ImageDataOptions(dataset="cifar100", labels="coarse")))


def test_failed_download_raises_data_missing_and_leaves_no_part(tmp_path, cache, monkeypatch):
    source = dataclasses.replace(fetch.SOURCES["cifar10"], url=(tmp_path / "nowhere.tar.gz").as_uri())
    monkeypatch.setitem(fetch.SOURCES, "cifar10", source)
    monkeypatch.setenv("DIFFUSIONBLOCKS_OFFLINE", "0")
    with pytest.raises(fetch.DataMissing, match=r"^model\.data: CIFAR-10 .*download failed"):
        images.load(images.ImageDataOptions(dataset="cifar10"))
    assert not list(cache.glob("*.part")) and not (cache / "cifar-10-python.tar.gz").exists()


def test_user_path_skips_cache_and_checksum(cache, cifar10_archive):
    data = images.load(images.ImageDataOptions(dataset="cifar10", data=str(cifar10_archive)))
    assert data.train_images.shape == (120, 3, 32, 32) and not cache.exists()
