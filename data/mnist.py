"""MNIST handwritten digits (LeCun, Cortes, Burges), 28x28 grayscale, 10 classes.

Reads the 8,000-digit subset shipped with this package (data/mnist8k.npz, see data/ATTRIBUTION.txt), any .npz
with the same keys, or the original IDX files (http://yann.lecun.com/exdb/mnist/: a big-endian header of two
zero bytes, a type code, the number of dimensions and one uint32 per dimension, then the raw values).
"""

import gzip
import zipfile
from pathlib import Path

import numpy as np
import torch

from .images import ImageArray, check_resolution, resize_uint8

SHIPPED_NPZ = Path(__file__).parent / "mnist8k.npz"
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
EXPECTED = ("an .npz with keys 'images' (uint8 [N, 28, 28]) and 'labels', or a directory holding "
            f"{IDX_FILES[0]} and {IDX_FILES[1]} (optionally .gz)")


def read_idx(path, ndim):
    """Read one IDX file (optionally gzipped) into a numpy array with `ndim` dimensions."""
    try:
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"cannot read IDX file {path}: {error}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES or raw[3] != ndim:
        raise ValueError(f"{path} is not an IDX file with {ndim} dimension(s): bad magic number "
                         f"{raw[:4].hex() or 'none'} (expected 0000xx{ndim:02x} with a known type code xx)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"IDX file {path} is truncated: its header needs {header} bytes, the file has {len(raw)}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"IDX file {path} is truncated or corrupt: shape {list(dims)} needs {expected} bytes, "
                         f"the file has {len(raw)}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find_idx(directory, name):
    for candidate in (directory / name, directory / (name + ".gz")):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"MNIST directory {directory} has no {name} (or {name}.gz); expected {EXPECTED}")


def _read_npz(path):
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"cannot read MNIST file {path} as .npz: {error}") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"MNIST file {path} holds a single array, not an .npz archive; expected {EXPECTED}")
    with npz:
        missing = {"images", "labels"} - set(npz.files)
        if missing:
            raise ValueError(f"MNIST file {path} has keys {sorted(npz.files)}, expected 'images' and 'labels' "
                             f"(missing {sorted(missing)})")
        try:
            return npz["images"], npz["labels"]
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
            raise ValueError(f"MNIST file {path} is corrupt: {error}") from None


def load_mnist_arrays(path=None):
    """Return (images uint8 [N, 28, 28], labels [N]) from an .npz file or a directory of IDX files."""
    path = SHIPPED_NPZ if path is None else Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"MNIST path not found: {path}; expected {EXPECTED}")
    if path.is_dir():
        directory = path / "MNIST" / "raw" if (path / "MNIST" / "raw").is_dir() else path  # torchvision's layout
        images = read_idx(_find_idx(directory, IDX_FILES[0]), ndim=3)
        labels = read_idx(_find_idx(directory, IDX_FILES[1]), ndim=1)
    elif path.suffix == ".npz":
        images, labels = _read_npz(path)
    else:
        raise ValueError(f"MNIST path {path} is neither an .npz file nor a directory; expected {EXPECTED}")
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"MNIST images in {path} must be uint8 [N, 28, 28] or [N, 1, 28, 28], "
                         f"got {images.dtype} {list(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"MNIST in {path} holds no images")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"MNIST in {path} has {images.shape[0]} images but labels of shape {list(labels.shape)}; "
                         f"expected one label per image")
    if labels.dtype.kind not in "iu" or labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"MNIST labels in {path} must be integers 0..9, got dtype {labels.dtype}"
                         + (f" with range {labels.min()}..{labels.max()}" if labels.size else ""))
    return images, labels


class MNIST(ImageArray):
    """MNIST digits as [1, resolution, resolution] images in [-1, 1]; 10 classes (default: the shipped 8k subset)."""

    def __init__(self, path=None, resolution=28, limit=None):
        check_resolution(resolution)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"limit must be None or a positive integer number of images, got {limit!r}")
        images, labels = load_mnist_arrays(path)
        if limit is not None:  # at most `limit` images: the first ones
            images, labels = images[:limit], labels[:limit]
        images = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1)
        if resolution != 28:
            images = resize_uint8(images, resolution)
        super().__init__(images, torch.from_numpy(labels.astype(np.int64)), num_classes=10)
