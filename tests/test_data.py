"""Tests of the data package: registry contract, MNIST (.npz and IDX), CIFAR-10 (safe unpickling), ImageFolder, toy sets."""

import gzip
import math
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from data import DATASETS, CIFAR10, MNIST, Checkerboard, EightGaussians, ImageFolder, Moons, SwissRoll
from data.mnist import read_idx

NEEDS_FILES = {"cifar10", "imagefolder"}  # no data ships for these: their defaults must fail clearly


# ---------------------------------------------------------------- registry contract

def test_registry_names():
    assert set(DATASETS) == {"mnist", "cifar10", "imagefolder", "moons", "8gaussians", "checkerboard", "swissroll",
                             "gmm"}
    for name, cls in DATASETS.items():
        first_line = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        assert first_line, f"{name} lacks a one-line docstring"


def check_dataset(dataset):
    assert isinstance(dataset.shape, tuple) and isinstance(dataset.num_classes, int)
    x, label = dataset[len(dataset) - 1]
    assert x.dtype == torch.float32 and tuple(x.shape) == dataset.shape and torch.isfinite(x).all()
    if len(dataset.shape) == 3:  # images
        assert x.min() >= -1 and x.max() <= 1
    assert label.dtype == torch.int64 and label.dim() == 0
    assert 0 <= label < max(dataset.num_classes, 1)
    batch = min(4, len(dataset))
    xs, labels = next(iter(DataLoader(dataset, batch_size=batch)))
    assert xs.shape == (batch, *dataset.shape) and labels.shape == (batch,) and labels.dtype == torch.int64


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_registry_defaults(name):
    if name in NEEDS_FILES:
        with pytest.raises(FileNotFoundError, match="path"):
            DATASETS[name]()
        return
    kwargs = {} if name == "mnist" else {"n": 256}
    check_dataset(DATASETS[name](**kwargs))


# ---------------------------------------------------------------- MNIST

def test_mnist_default_is_the_shipped_8k():
    mnist = MNIST()
    assert len(mnist) == 8000 and mnist.num_classes == 10 and mnist.shape == (1, 28, 28)
    assert mnist.images.dtype == torch.uint8 and mnist.images.shape == (8000, 1, 28, 28)
    assert set(mnist.labels.tolist()) == set(range(10))
    x, label = mnist[0]
    assert x.min() == -1 and x.max() == 1 and label == mnist.labels[0]
    assert torch.equal(x, mnist.images[0].float() / 127.5 - 1)


def test_mnist_resolution_and_limit():
    small = MNIST(limit=50)
    big = MNIST(resolution=32, limit=50)
    assert len(big) == 50 and big.shape == (1, 32, 32) and big.images.shape == (50, 1, 32, 32)
    assert big[0][0].shape == (1, 32, 32)
    # Upsampling keeps the overall ink: mean pixel values agree to within rounding.
    assert abs(big.images.float().mean() - small.images.float().mean()) < 1.0
    assert torch.equal(big.labels, small.labels)


def write_idx(path, array, type_code=0x08):
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.astype(">u1").tobytes()
    with (gzip.open(path, "wb") if str(path).endswith(".gz") else open(path, "wb")) as f:
        f.write(data)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_mnist_idx_round_trip(tmp_path, suffix):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels)
    mnist = MNIST(path=tmp_path)
    assert len(mnist) == 5 and torch.equal(mnist.images[:, 0], torch.from_numpy(images))
    assert mnist.labels.tolist() == [3, 1, 4, 1, 5]
    assert torch.equal(mnist[2][0], torch.from_numpy(images[2]).float().unsqueeze(0) / 127.5 - 1)


def test_mnist_npz_with_channel_axis(tmp_path):
    images = np.arange(3 * 28 * 28, dtype=np.int64).reshape(3, 1, 28, 28).astype(np.uint8)
    np.savez(tmp_path / "m.npz", images=images, labels=np.array([0, 9, 2]))
    mnist = MNIST(path=str(tmp_path / "m.npz"))
    assert torch.equal(mnist.images, torch.from_numpy(images)) and mnist.labels.tolist() == [0, 9, 2]


def test_mnist_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        MNIST(path=tmp_path / "nowhere")
    np.savez(tmp_path / "keys.npz", pixels=np.zeros((2, 28, 28), np.uint8), targets=np.zeros(2))
    with pytest.raises(ValueError, match=r"\['pixels', 'targets'\].*'images' and 'labels'"):
        MNIST(path=tmp_path / "keys.npz")
    np.savez(tmp_path / "short.npz", images=np.zeros((5, 28, 28), np.uint8), labels=np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match="5 images but labels"):
        MNIST(path=tmp_path / "short.npz")
    np.savez(tmp_path / "float.npz", images=np.zeros((2, 28, 28), np.float32), labels=np.zeros(2, np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        MNIST(path=tmp_path / "float.npz")
    np.savez(tmp_path / "range.npz", images=np.zeros((2, 28, 28), np.uint8), labels=np.array([1, 10]))
    with pytest.raises(ValueError, match="0..9"):
        MNIST(path=tmp_path / "range.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip archive at all")
    with pytest.raises(ValueError, match="junk.npz"):
        MNIST(path=tmp_path / "junk.npz")
    (tmp_path / "digits.txt").write_text("1 2 3")
    with pytest.raises(ValueError, match="neither an .npz file nor a directory"):
        MNIST(path=tmp_path / "digits.txt")
    with pytest.raises(ValueError, match="resolution"):
        MNIST(resolution=0)
    with pytest.raises(ValueError, match="limit"):
        MNIST(limit=0)


def test_mnist_bad_idx(tmp_path):
    images = np.zeros((4, 28, 28), np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte", images)
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte"):
        MNIST(path=tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="4 images but labels of shape \\[3\\]"):
        MNIST(path=tmp_path)
    raw = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(raw[:-10])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "train-images-idx3-ubyte", ndim=3)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01" + raw[4:])  # labels' magic
    with pytest.raises(ValueError, match="magic number 00000801"):
        MNIST(path=tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x1f\x8b\x08\x03" + raw[4:])
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "train-images-idx3-ubyte", ndim=3)
    (tmp_path / "broken.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ValueError, match="cannot read IDX"):
        read_idx(tmp_path / "broken.gz", ndim=1)


# ---------------------------------------------------------------- CIFAR-10

def fake_batch(n, offset):
    data = (np.arange(n * 3072).reshape(n, 3072) + offset).astype(np.uint8)
    return {b"batch_label": b"fake", b"data": data, b"labels": [(offset + i) % 10 for i in range(n)]}


def write_fake_cifar(root, protocol=None):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        with open(folder / name, "wb") as f:
            pickle.dump(fake_batch(2, offset=i), f, protocol=protocol)
    return folder


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_reads_the_python_layout(tmp_path, protocol):
    folder = write_fake_cifar(tmp_path, protocol)
    train = CIFAR10(path=folder)
    assert len(train) == 10 and train.shape == (3, 32, 32) and train.num_classes == 10
    assert train.labels.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
    expected = fake_batch(2, offset=1)[b"data"][1]  # 4th image: second of data_batch_2
    assert torch.equal(train.images[3], torch.from_numpy(expected.reshape(3, 32, 32)))
    assert train.images[3, 1, 0, 0] == expected[1024]  # green plane starts at 1024
    check_dataset(train)
    test = CIFAR10(path=tmp_path, train=False)  # the parent of cifar-10-batches-py works too
    assert len(test) == 2 and test.labels.tolist() == [5, 6]


def test_cifar_reads_the_tar_gz(tmp_path):
    folder = write_fake_cifar(tmp_path / "src")
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as archive:
        archive.add(folder, arcname="cifar-10-batches-py")
    assert torch.equal(CIFAR10(path=tmp_path / "cifar-10-python.tar.gz").images, CIFAR10(path=folder).images)


def python2_batch(data, labels):
    """A batch pickled the way the original (Python 2) CIFAR files are: str opcodes and numpy.core globals."""
    def string(s):
        return b"U" + bytes([len(s)]) + s if len(s) < 256 else b"T" + struct.pack("<I", len(s)) + s
    n = data.shape[0]
    dtype = (b"cnumpy\ndtype\n" + string(b"u1") + b"K\x00K\x01\x87R"
             + b"(K\x03" + string(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + string(b"b") + b"\x87R"
             + b"(K\x01K" + bytes([n]) + b"M" + struct.pack("<H", 3072) + b"\x86" + dtype + b"\x89"
             + string(data.tobytes()) + b"tb")
    label_list = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return b"\x80\x02}(" + string(b"data") + array + string(b"labels") + label_list + b"u."


def test_cifar_reads_python2_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    data = np.random.default_rng(0).integers(0, 256, size=(3, 3072), dtype=np.uint8)
    (folder / "test_batch").write_bytes(python2_batch(data, [7, 0, 9]))
    test = CIFAR10(path=folder, train=False)
    assert torch.equal(test.images, torch.from_numpy(data.reshape(3, 3, 32, 32))) and test.labels.tolist() == [7, 0, 9]


class RunsACommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_cifar_refuses_code_in_pickles(tmp_path):
    folder = write_fake_cifar(tmp_path)
    marker = tmp_path / "pwned"
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": RunsACommand(f"touch {marker}"), b"labels": [0]}, f)
    with pytest.raises(ValueError, match=r"refusing to unpickle .*system"):
        CIFAR10(path=folder, train=False)
    assert not marker.exists()
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": bytes.fromhex}, f, protocol=2)
    with pytest.raises(ValueError, match="refusing"):
        CIFAR10(path=folder, train=False)


def test_cifar_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="cs.toronto.edu"):
        CIFAR10()
    with pytest.raises(FileNotFoundError, match="not found.*cifar-10-python.tar.gz"):
        CIFAR10(path=tmp_path / "missing")
    folder = write_fake_cifar(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="lacks data_batch_3"):
        CIFAR10(path=folder)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"uint8 array \[N, 3072\]"):
        CIFAR10(path=folder, train=False)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, f)
    with pytest.raises(ValueError, match="'labels' must be 2 integers"):
        CIFAR10(path=folder, train=False)
    (folder / "test_batch").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="not a readable CIFAR-10 batch"):
        CIFAR10(path=folder, train=False)
    (tmp_path / "file.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(ValueError, match="neither a folder nor a readable .tar.gz"):
        CIFAR10(path=tmp_path / "file.tar.gz")


# ---------------------------------------------------------------- ImageFolder

def bars(width, height):
    """RGB image: red outer columns/rows, green in the centred height x height (or width x width) square."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 0] = 255
    side = min(width, height)
    top, left = (height - side) // 2, (width - side) // 2
    pixels[top:top + side, left:left + side] = (0, 255, 0)
    return Image.fromarray(pixels)


def test_imagefolder_classes_resize_and_crop(tmp_path):
    for name in ("dogs", "cats"):
        (tmp_path / name).mkdir()
    bars(20, 10).save(tmp_path / "cats" / "a.png")
    bars(10, 30).save(tmp_path / "cats" / "b.PNG")
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(tmp_path / "dogs" / "c.png")
    (tmp_path / "dogs" / "notes.txt").write_text("ignored")
    folder = ImageFolder(path=tmp_path, resolution=10)
    assert folder.classes == ["cats", "dogs"] and folder.num_classes == 2 and len(folder) == 3
    assert folder.labels.tolist() == [0, 0, 1] and folder.shape == (3, 10, 10)
    for index in (0, 1):  # the centre crop keeps exactly the green square
        x, label = folder[index]
        assert label == 0 and x.shape == (3, 10, 10)
        assert torch.equal(x[1], torch.ones(10, 10)) and torch.equal(x[0], -torch.ones(10, 10))
    x, label = folder[2]
    assert label == 1 and torch.equal(x, torch.ones(3, 10, 10))  # grayscale white -> RGB white
    gray = ImageFolder(path=tmp_path, resolution=4, channels=1)
    assert gray.shape == (1, 4, 4) and gray[0][0].shape == (1, 4, 4)
    check_dataset(gray)


def test_imagefolder_flat_is_unlabelled(tmp_path):
    for i in range(3):
        bars(12, 12).save(tmp_path / f"{i}.jpg")
    folder = ImageFolder(path=tmp_path, resolution=8)
    assert folder.num_classes == 0 and len(folder) == 3
    check_dataset(folder)


def test_imagefolder_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolder(path=tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolder(path=tmp_path)
    with pytest.raises(ValueError, match="channels"):
        ImageFolder(path=tmp_path, channels=2)
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "full_class").mkdir()
    bars(8, 8).save(tmp_path / "full_class" / "a.png")
    with pytest.raises(ValueError, match="empty_class"):
        ImageFolder(path=tmp_path)
    (tmp_path / "empty_class" / "broken.png").write_bytes(b"not a png")
    folder = ImageFolder(path=tmp_path, resolution=8)
    with pytest.raises(ValueError, match="broken.png"):
        folder[0]
    bars(8, 8).save(tmp_path / "stray.png")
    with pytest.raises(ValueError, match="mixes images"):
        ImageFolder(path=tmp_path)


# ---------------------------------------------------------------- toy sets

TOY = [Moons, EightGaussians, Checkerboard, SwissRoll]


@pytest.mark.parametrize("cls", TOY)
def test_toy_reproducible_and_unit_scale(cls):
    a, b, c = cls(n=4000, seed=1), cls(n=4000, seed=1), cls(n=4000, seed=2)
    assert a.points.shape == (4000, 2) and a.points.dtype == torch.float32
    assert torch.equal(a.points, b.points) and not torch.equal(a.points, c.points)
    assert a.points.mean(0).abs().max() < 0.1
    assert 0.85 < a.points.var(0).mean() < 1.15
    with pytest.raises(ValueError, match="n must be"):
        cls(n=0)


def test_toy_geometry():
    board = Checkerboard(n=2000).points / (math.sqrt(3) / 2)  # back to the [-2, 2] board
    assert board.abs().max() <= 2 + 1e-5
    assert ((torch.floor(board[:, 0]) + torch.floor(board[:, 1])).remainder(2) == 0).all()
    gaussians = EightGaussians(n=2000, std=0.01).points
    assert torch.allclose(gaussians.norm(dim=1), torch.full((2000,), math.sqrt(2)), atol=0.05)
    angles = torch.atan2(gaussians[:, 1], gaussians[:, 0]) / (2 * math.pi / 8)
    assert (angles - angles.round()).abs().max() < 0.05 and len(set(angles.round().remainder(8).tolist())) == 8
    moons = Moons(n=2000, noise=0.0).points * 0.705 + torch.tensor([0.5, 0.25])
    upper = (moons - torch.tensor([0.0, 0.0])).norm(dim=1)
    lower = (moons - torch.tensor([1.0, 0.5])).norm(dim=1)
    assert torch.minimum((upper - 1).abs(), (lower - 1).abs()).max() < 1e-5
    with pytest.raises(ValueError, match="noise"):
        Moons(noise=-1.0)


def test_gmm_image_shape_is_the_same_mixture_as_images():
    from data.mixtures import GaussianMixtureData
    from models.analytic import GaussianMixtureDenoiser
    flat = GaussianMixtureData(dim=64, components=4, n=50, seed=3)
    image = GaussianMixtureData(dim=64, components=4, n=50, seed=3, image_shape=[1, 8, 8])
    assert image.shape == (1, 8, 8) and image[0][0].shape == (1, 8, 8)
    assert torch.equal(image.x.reshape(50, 64), flat.x) and torch.equal(image.labels, flat.labels)
    x, sigma = torch.randn(5, 64, dtype=torch.float64), torch.full((5,), 0.7, dtype=torch.float64)
    exact_flat = GaussianMixtureDenoiser.from_data(flat)(x, sigma)
    exact_image = GaussianMixtureDenoiser.from_data(image)(x.reshape(5, 1, 8, 8), sigma)
    assert torch.allclose(exact_image.reshape(5, 64), exact_flat, atol=1e-12)
    with pytest.raises(ValueError, match="image_shape"):
        GaussianMixtureData(dim=64, image_shape=[1, 8, 9])
