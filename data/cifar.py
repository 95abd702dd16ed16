"""CIFAR-10 (Krizhevsky 2009): 60,000 32x32 colour images in 10 classes, from the "python version" files.

The batches (cifar-10-batches-py/data_batch_1..5 and test_batch) are pickled dicts with b"data" uint8
[10000, 3072] (1024 red, 1024 green, 1024 blue values per image, rows top to bottom) and b"labels".
A pickle can run arbitrary code when loaded, so they are read with a restricted unpickler that only builds
numpy arrays and refuses every other global. The folder or the downloaded .tar.gz are both accepted.
"""

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from .images import ImageArray

try:  # numpy >= 2 (numpy 1.x pickles name numpy.core, which maps to the same functions)
    from numpy._core import multiarray as _multiarray, numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray, numeric as _numeric

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
FOLDER = "cifar-10-batches-py"
HOW_TO_GET = (f"download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and pass "
              f"path=<the .tar.gz> or path=<its extracted {FOLDER} folder>")


def _latin1_encode(text, encoding):
    # Python 3 pickles with protocol < 3 store bytes as _codecs.encode(text, "latin1"); allow only that.
    if encoding not in ("latin1", "latin-1"):
        raise ValueError(f"refusing _codecs.encode with encoding {encoding!r} in a CIFAR-10 batch")
    return text.encode("latin1")


ALLOWED_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    **{(module, "_reconstruct"): _multiarray._reconstruct
       for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "scalar"): _multiarray.scalar for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "_frombuffer"): _numeric._frombuffer for module in ("numpy.core.numeric", "numpy._core.numeric")},
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only numpy arrays, dtypes and plain containers; any other global is refused."""

    def find_class(self, module, name):
        if (module, name) not in ALLOWED_GLOBALS:
            raise ValueError(f"refusing to unpickle {module}.{name}: CIFAR-10 batches hold only numpy arrays")
        return ALLOWED_GLOBALS[(module, name)]


def load_batch(raw, source):
    """Unpickle one CIFAR-10 batch (bytes) safely; return (images uint8 [N, 3, 32, 32], labels int64 [N])."""
    try:
        # latin1 decodes the Python 2 strings of the original files, as numpy requires for their arrays.
        batch = RestrictedUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None
    except Exception as error:  # corrupt or truncated pickles raise many types
        raise ValueError(f"{source} is not a readable CIFAR-10 batch: {type(error).__name__}: {error}") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{source} is not a CIFAR-10 batch: expected a dict, got {type(batch).__name__}")
    batch = {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{source} has keys {sorted(map(str, batch))}, expected 'data' and 'labels'")
    data, labels = batch["data"], np.asarray(batch["labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{source}: 'data' must be a uint8 array [N, 3072], got "
                         f"{getattr(data, 'dtype', type(data).__name__)} {list(getattr(data, 'shape', []))}")
    if labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu" or (
            labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise ValueError(f"{source}: 'labels' must be {data.shape[0]} integers in 0..9, got {labels.dtype} "
                         f"{list(labels.shape)}")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels.astype(np.int64))


def _read_batches(path, names):
    if path.is_dir():
        folder = path / FOLDER if (path / FOLDER).is_dir() else path
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"CIFAR-10 folder {folder} lacks {', '.join(missing)}; {HOW_TO_GET}")
        return [(folder / name).read_bytes() for name in names]
    try:
        archive = tarfile.open(path)
    except (tarfile.TarError, OSError, EOFError) as error:
        raise ValueError(f"CIFAR-10 path {path} is neither a folder nor a readable .tar.gz ({error}); "
                         f"{HOW_TO_GET}") from None
    with archive:
        try:  # everything is read into memory, nothing is extracted to disk
            members = {Path(member.name).name: member for member in archive.getmembers() if member.isfile()}
            found = {name: archive.extractfile(members[name]).read() for name in names if name in members}
        except (tarfile.TarError, OSError, EOFError) as error:
            raise ValueError(f"CIFAR-10 archive {path} is corrupt: {error}") from None
    missing = [name for name in names if name not in found]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 archive {path} lacks {', '.join(missing)}; {HOW_TO_GET}")
    return [found[name] for name in names]


class CIFAR10(ImageArray):
    """CIFAR-10 as [3, 32, 32] images in [-1, 1]; 10 classes (needs the downloaded python-version files)."""

    classes = CLASSES

    def __init__(self, path=None, train=True):
        if path is None:
            raise FileNotFoundError(f"CIFAR-10 is not shipped with this package: {HOW_TO_GET}")
        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"CIFAR-10 path not found: {path}; {HOW_TO_GET}")
        if not isinstance(train, bool):
            raise ValueError(f"train must be True (data_batch_1..5) or False (test_batch), got {train!r}")
        names = TRAIN_FILES if train else TEST_FILES
        batches = [load_batch(raw, f"CIFAR-10 batch {name} in {path}")
                   for name, raw in zip(names, _read_batches(path, names))]
        super().__init__(torch.cat([images for images, _ in batches]), torch.cat([labels for _, labels in batches]),
                         num_classes=10)
