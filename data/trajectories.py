"""The trajectory store: teacher ODE rollouts (z, x at K saved sigmas, label) on disk, in shards with a manifest.

Denoising Student (Luhman & Luhman 2021) learns from pairs (z, teacher's x0); reflow (Liu, Gong & Liu 2023) from
the coupling (z, x0) of the previous flow; DSNO (Zheng et al. 2023) from the teacher's states at a few times of each
trajectory. All are rollouts of the teacher's probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma from
x = grid[0] * z (VE convention; grid[0] = sigma_max), saved at K sigmas of the solver's grid. This file is pure
storage; `runs/make_pairs.py` runs the solver and fills it.

    manifest.json            format, teacher fingerprint and description, solver (+ options), nfe, schedule (+ kwargs),
                             the full grid, saved indices and sigmas, shape, num_classes, seed, n, shard_size, dtype,
                             and per finished shard: directory, count, each file's size in bytes and sha256
    shard_00000/z.npy        [count, *shape] float32 unit noise
    shard_00000/xs.npy       [count, K, *shape] float32 or float16: the states at the saved sigmas (descending)
    shard_00000/labels.npy   [count] int64 (zeros when unconditional)

Shard i's noise and labels are a pure function of (seed, i); a shard is written under a temporary name and renamed
when complete, and the manifest is rewritten atomically after each shard. So a killed run, resumed, keeps the
finished shards and writes the same remaining ones.
"""
import collections
import copy
import hashlib
import io
import json
import math
import numbers
import os
import shutil
from pathlib import Path

import numpy as np
import torch

FORMAT = "fastdiff-trajectories-v1"
MANIFEST = "manifest.json"
FILES = ("z.npy", "xs.npy", "labels.npy")
DTYPES = {"float32": np.float32, "float16": np.float16}
# Fields that define a store: a request differing in any of them must not resume (or overwrite) it.
FIXED = ("format", "fingerprint", "solver", "solver_options", "nfe", "schedule", "schedule_kwargs", "grid",
         "saved_indices", "sigmas", "shape", "num_classes", "seed", "shard_size", "dtype")


def _check_grid(grid):
    """A solver schedule as a float64 CPU tensor: 1-D, strictly decreasing, ending in 0."""
    try:
        grid = torch.as_tensor(grid, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"grid must be a 1-D sequence of sigmas, got {type(grid).__name__}") from None
    levels = grid.tolist() if grid.ndim == 1 else []
    if len(levels) < 2 or any(b >= a for a, b in zip(levels, levels[1:])) or levels[-1] != 0:
        raise ValueError(f"grid must be a 1-D strictly decreasing schedule ending in 0, got {grid.tolist()}")
    return grid


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _not_text(values):
    if isinstance(values, (str, bytes)):
        raise TypeError("a string is not a list of sigmas")
    return values


def _evenly_spaced(steps, k):
    """Indices round(linspace(0, steps, k + 1))[1:], rounding halves up (so k <= steps gives distinct indices)."""
    return [int(math.floor(v + 0.5)) for v in np.linspace(0, steps, k + 1)[1:]]


def saved_indices(grid, save_sigmas):
    """Indices into `grid` (N + 1 sigmas, descending, ending in 0) of the states to save, ascending.

    save_sigmas an int K: K evenly spaced indices, the last always N (sigma = 0), never 0 (the start, sigma_max * z).
    A list of floats: each snapped to the nearest grid sigma (two snapping to the same one is an error)."""
    grid = _check_grid(grid)
    steps = len(grid) - 1
    if _is_int(save_sigmas):
        if save_sigmas < 1:
            raise ValueError(f"save_sigmas must be >= 1, got {save_sigmas}")
        if save_sigmas > steps:
            raise ValueError(f"save_sigmas={save_sigmas} is more than the {steps} states a solver grid of {steps} "
                             f"steps has after its start; use at most {steps} or more NFE")
        return _evenly_spaced(steps, int(save_sigmas))
    try:
        values = [float(v) for v in _not_text(save_sigmas)]
    except (TypeError, ValueError):
        raise ValueError(f"save_sigmas must be an int K or a list of sigmas, got {save_sigmas!r}") from None
    if not values or not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"save_sigmas must be a non-empty list of finite sigmas >= 0, got {values}")
    indices = {}
    for value in values:
        index = int((grid - value).abs().argmin())
        if index in indices:
            raise ValueError(f"save_sigmas {indices[index]:g} and {value:g} both snap to the grid sigma "
                             f"{float(grid[index]):g}; grid: {[round(s, 6) for s in grid.tolist()]}")
        indices[index] = value
    return sorted(indices)


def saved_sigmas(grid, save_sigmas):
    """The saved sigmas (float64 tensor [K], descending) of `saved_indices(grid, save_sigmas)`."""
    return _check_grid(grid)[saved_indices(grid, save_sigmas)]


def fingerprint(module):
    """sha256 hex of a module's class name, state_dict (names, dtypes, shapes, bytes, sorted by name) and, when
    present, its `parameterisation` and `sigma_data` (a Denoiser's output depends on them, not only on weights)."""
    digest = hashlib.sha256(type(module).__qualname__.encode())
    for attribute in ("parameterisation", "sigma_data"):
        if isinstance(getattr(module, attribute, None), (str, int, float)):
            digest.update(f"\0{attribute}={getattr(module, attribute)!r}".encode())
    for name, value in sorted(module.state_dict().items()):
        if not isinstance(value, torch.Tensor):  # extra state
            digest.update(f"\0{name}:{value!r}".encode())
            continue
        digest.update(f"\0{name}:{value.dtype}:{list(value.shape)}\0".encode())
        digest.update(value.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def shard_seed(seed, index):
    """The 63-bit seed of shard `index`'s noise and labels (rollout solvers are deterministic: no other stream)."""
    state = np.random.SeedSequence([int(seed), int(index), 0]).generate_state(1, np.uint64)[0]
    return int(state) & (2**63 - 1)


def _normalised(value):
    """`value` as it reads back from JSON (tuples -> lists), so requests and manifests compare equal."""
    return json.loads(json.dumps(value))


def _read_manifest(path):
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"no trajectory store at {path} (no {MANIFEST})")
    try:
        manifest = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{file} is not a {FORMAT} manifest")
    return manifest


def _write_atomic(file, data):
    tmp = file.with_name(f".{file.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)


def _numpy(array, dtype):
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    return np.ascontiguousarray(array, dtype=dtype)


def _files_intact(directory, entry):
    """A finished shard's files exist with their recorded sizes (cheap; the reader checks hashes)."""
    return all((directory / name).is_file() and (directory / name).stat().st_size == info["bytes"]
               for name, info in entry["files"].items())


class TrajectoryWriter:
    """Creates, or resumes, the store at `path` for one request. Metadata only: the caller computes each pending
    shard's states from `inputs(i)` and hands them to `write(i, z, xs, labels)`.

    An existing manifest must agree on every FIXED field (else ValueError, nothing touched); `n` may grow (the old
    last, partial shard is then rewritten with its new count) but not shrink."""

    def __init__(self, path, *, fingerprint, grid, save_sigmas, shape, n, solver, nfe, schedule, schedule_kwargs=None,
                 solver_options=None, num_classes=0, seed=0, shard_size=1000, dtype="float32", description=""):
        for name, value, low in (("n", n, 1), ("shard_size", shard_size, 1), ("num_classes", num_classes, 0),
                                 ("seed", seed, 0), ("nfe", nfe, 1)):
            if not _is_int(value) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
        shape = [int(s) for s in shape]
        if not shape or min(shape) < 1:
            raise ValueError(f"shape must be a non-empty list of positive sizes, got {shape}")
        grid = _check_grid(grid)
        indices = saved_indices(grid, save_sigmas)
        self.path = Path(path)
        self.manifest = _normalised(dict(
            format=FORMAT, fingerprint=fingerprint, description=description, solver=solver,
            solver_options=solver_options or {}, nfe=nfe, schedule=schedule, schedule_kwargs=schedule_kwargs or {},
            grid=grid.tolist(), saved_indices=indices, sigmas=grid[indices].tolist(), shape=shape,
            num_classes=num_classes, seed=seed, n=n, shard_size=shard_size,
            num_shards=math.ceil(n / shard_size), dtype=dtype, shards=[]))
        if (self.path / MANIFEST).exists():
            self._resume(_read_manifest(self.path))
        self.path.mkdir(parents=True, exist_ok=True)
        for leftover in self.path.glob(".shard_*.tmp"):  # a shard being written when the last run was killed
            shutil.rmtree(leftover)
        self._save_manifest()

    def _resume(self, old):
        if old.get("fingerprint") != self.manifest["fingerprint"]:
            raise ValueError(f"{self.path} holds a store made by another teacher (fingerprint "
                             f"{str(old.get('fingerprint'))[:12]}..., this teacher "
                             f"{self.manifest['fingerprint'][:12]}...); "
                             f"use another output directory")
        differ = [key for key in FIXED if old.get(key) != self.manifest[key]]
        if differ:
            detail = "; ".join(f"{key}: {old.get(key)!r} there, {self.manifest[key]!r} asked" for key in differ[:3])
            raise ValueError(f"{self.path} holds a store made with other settings ({detail}); "
                             f"use another output directory")
        if self.manifest["n"] < old["n"]:
            raise ValueError(f"{self.path} holds n={old['n']} rollouts; asking for fewer (n={self.manifest['n']}) "
                             f"would drop some: ask for n >= {old['n']} or use another output directory")
        self.manifest["shards"] = [entry for entry in old["shards"]
                                   if entry["index"] < self.num_shards and entry["count"] == self.count(entry["index"])
                                   and _files_intact(self.path / entry["dir"], entry)]

    @property
    def num_shards(self):
        return self.manifest["num_shards"]

    def count(self, index):
        """Number of rollouts in shard `index` (shard_size, or less for the last)."""
        size = self.manifest["shard_size"]
        return min(size, self.manifest["n"] - index * size)

    def pending(self):
        """Indices of the shards still to write, ascending."""
        done = {entry["index"] for entry in self.manifest["shards"]}
        return [i for i in range(self.num_shards) if i not in done]

    def inputs(self, index):
        """(z float32 [count, *shape], labels int64 [count]) of shard `index`: a pure function of (seed, index).
        Labels are uniform over num_classes (drawn after z), zeros when num_classes = 0."""
        generator = torch.Generator().manual_seed(shard_seed(self.manifest["seed"], index))
        count, num_classes = self.count(index), self.manifest["num_classes"]
        z = torch.randn([count, *self.manifest["shape"]], generator=generator)
        if num_classes:
            return z, torch.randint(0, num_classes, (count,), generator=generator)
        return z, torch.zeros(count, dtype=torch.int64)

    def write(self, index, z, xs, labels):
        """Write shard `index` (tensors or arrays), rename it into place, then record it in the manifest."""
        count, shape, k = self.count(index), list(self.manifest["shape"]), len(self.manifest["sigmas"])
        arrays = {"z.npy": _numpy(z, np.float32), "xs.npy": _numpy(xs, DTYPES[self.manifest["dtype"]]),
                  "labels.npy": _numpy(labels, np.int64)}
        for name, expected in (("z.npy", [count, *shape]), ("xs.npy", [count, k, *shape]), ("labels.npy", [count])):
            if list(arrays[name].shape) != expected:
                raise ValueError(f"shard {index}: {name[:-4]} has shape {list(arrays[name].shape)}, "
                                 f"expected {expected}")
        name = f"shard_{index:05d}"
        tmp, final = self.path / f".{name}.tmp", self.path / name
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        files = {}
        for file, array in arrays.items():
            buffer = io.BytesIO()
            np.save(buffer, array)
            data = buffer.getvalue()
            with open(tmp / file, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            files[file] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        if final.exists():  # written by a run killed before it could record it
            shutil.rmtree(final)
        os.replace(tmp, final)
        entry = {"index": index, "dir": name, "count": count, "files": files}
        shards = [e for e in self.manifest["shards"] if e["index"] != index] + [entry]
        self.manifest["shards"] = sorted(shards, key=lambda e: e["index"])
        self._save_manifest()

    def _save_manifest(self):
        _write_atomic(self.path / MANIFEST, json.dumps(self.manifest, indent=1).encode())


def _sha256(file, chunk=1 << 24):
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _open_budget(num_shards):
    """How many shards to keep memory-mapped at once: each map holds a file descriptor (3 per shard)."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = 3 * num_shards + 256
        if soft != resource.RLIM_INFINITY and soft < wanted and (hard == resource.RLIM_INFINITY or hard > soft):
            soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        return num_shards if soft == resource.RLIM_INFINITY else max(4, (soft - 256) // 3)
    except (ImportError, ValueError, OSError):
        return 64


class TrajectoryStore(torch.utils.data.Dataset):
    """A finished store, memory-mapped: item i is (z float32 [*shape], xs float32 [K, *shape], label int64).

    `fingerprint` given: the store must come from that teacher. verify=True checks every file's sha256 (sizes and
    shapes are always checked). allow_incomplete=True serves the finished shards of a store still being written.
    Attributes: shape, num_classes, sigmas (float64 [K], descending), saved_indices (into manifest["grid"]),
    fingerprint, manifest."""

    def __init__(self, path, fingerprint=None, verify=True, allow_incomplete=False):
        self.path = Path(path)
        self.manifest = manifest = _read_manifest(self.path)
        if fingerprint is not None and fingerprint != manifest["fingerprint"]:
            raise ValueError(f"store made by another teacher: {self.path} has teacher fingerprint "
                             f"{manifest['fingerprint'][:12]}..., expected {fingerprint[:12]}...")
        self._shards = manifest["shards"]
        done = {entry["index"] for entry in self._shards}
        missing = [i for i in range(manifest["num_shards"]) if i not in done]
        if missing and not allow_incomplete:
            raise ValueError(f"{self.path} is incomplete: {len(done)} of {manifest['num_shards']} shards written "
                             f"(missing shard {missing[0]}{' and more' if len(missing) > 1 else ''}); resume it with "
                             f"runs.make_pairs (same arguments) or pass allow_incomplete=True")
        self.shape = tuple(manifest["shape"])
        self.num_classes = manifest["num_classes"]
        self.fingerprint = manifest["fingerprint"]
        self.sigmas = torch.tensor(manifest["sigmas"], dtype=torch.float64)
        self.saved_indices = list(manifest["saved_indices"])
        self._times = None  # positions among the stored sigmas that this view serves (None: all)
        for entry in self._shards:
            self._check_shard(entry, verify)
        self._offsets = np.cumsum([0] + [entry["count"] for entry in self._shards])
        self._open = collections.OrderedDict()
        self._max_open = _open_budget(len(self._shards))

    def _check_shard(self, entry, verify):
        k, count = len(self.manifest["sigmas"]), entry["count"]
        expected = {"z.npy": ([count, *self.shape], np.float32), "labels.npy": ([count], np.int64),
                    "xs.npy": ([count, k, *self.shape], DTYPES[self.manifest["dtype"]])}
        for name, (shape, dtype) in expected.items():
            file, info = self.path / entry["dir"] / name, entry["files"][name]
            if not file.is_file():
                raise ValueError(f"{file} is missing (the store lists it as written)")
            size = file.stat().st_size
            if size != info["bytes"]:
                raise ValueError(f"{file} is truncated or corrupt: {size} bytes, the manifest says {info['bytes']}")
            if verify and _sha256(file) != info["sha256"]:
                raise ValueError(f"{file} is corrupt: its sha256 differs from the manifest's")
            try:
                array = np.load(file, mmap_mode="r")
            except (ValueError, OSError, EOFError) as e:
                raise ValueError(f"{file} is not a readable .npy file (truncated or corrupt?): {e}") from None
            if list(array.shape) != shape or array.dtype != dtype:
                raise ValueError(f"{file} holds {array.dtype} {list(array.shape)}, expected {np.dtype(dtype)} {shape}")
            del array

    def __getstate__(self):  # DataLoader workers reopen the maps instead of pickling their contents
        state = self.__dict__.copy()
        state["_open"] = collections.OrderedDict()
        return state

    def _arrays(self, shard):
        """(z, xs, labels) memory maps of the shard at position `shard`, least recently used ones closed."""
        arrays = self._open.pop(shard, None)
        if arrays is None:
            directory = self.path / self._shards[shard]["dir"]
            arrays = tuple(np.load(directory / name, mmap_mode="r") for name in FILES)
            while len(self._open) >= self._max_open:
                self._open.popitem(last=False)
        self._open[shard] = arrays
        return arrays

    def __len__(self):
        return int(self._offsets[-1])

    def _locate(self, indices):
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < -len(self) or indices.max() >= len(self)):
            raise IndexError(f"index out of range for a store of {len(self)} rollouts")
        indices = np.where(indices < 0, indices + len(self), indices)
        shards = np.searchsorted(self._offsets, indices, side="right") - 1
        return shards, indices - self._offsets[shards]

    def __getitem__(self, index):
        (shard,), (row,) = self._locate([index])
        z, xs, labels = self._arrays(int(shard))
        states = xs[row] if self._times is None else xs[row][self._times]
        return (torch.from_numpy(np.array(z[row], dtype=np.float32)),
                torch.from_numpy(np.array(states, dtype=np.float32)),
                torch.tensor(int(labels[row]), dtype=torch.int64))

    def batch(self, indices):
        """Items `indices` stacked, (z [B, *shape], xs [B, K, *shape], labels [B]), reading each shard once."""
        shards, rows = self._locate(indices)
        z = np.empty((len(rows), *self.shape), np.float32)
        xs = np.empty((len(rows), len(self.sigmas), *self.shape), np.float32)
        labels = np.empty(len(rows), np.int64)
        for shard in np.unique(shards):
            where = np.nonzero(shards == shard)[0]
            z_shard, xs_shard, labels_shard = self._arrays(int(shard))
            z[where] = z_shard[rows[where]]
            xs[where] = xs_shard[rows[where]] if self._times is None else xs_shard[rows[where]][:, self._times]
            labels[where] = labels_shard[rows[where]]
        return torch.from_numpy(z), torch.from_numpy(xs), torch.from_numpy(labels)

    def select(self, save_sigmas):
        """A view serving a subset of the saved sigmas: an int K (evenly spaced as in `saved_indices`, the stored
        sigmas standing for the grid after its start, so the last is kept) or a list of sigmas among the stored."""
        stored = self.sigmas.tolist()
        if _is_int(save_sigmas):
            if save_sigmas < 1:
                raise ValueError(f"select: K must be >= 1, got {save_sigmas}")
            if save_sigmas > len(stored):
                raise ValueError(f"select({save_sigmas}): K larger than the stored trajectory "
                                 f"({len(stored)} sigmas: {[round(s, 6) for s in stored]})")
            positions = [i - 1 for i in _evenly_spaced(len(stored), int(save_sigmas))]
        else:
            try:
                values = [float(v) for v in _not_text(save_sigmas)]
            except (TypeError, ValueError):
                raise ValueError(f"select takes an int K or a list of sigmas, got {save_sigmas!r}") from None
            positions = set()
            for value in values:
                close = [i for i, s in enumerate(stored) if math.isclose(s, value, rel_tol=1e-5, abs_tol=1e-9)]
                if not close:
                    raise ValueError(f"select: sigma {value:g} is not among the stored sigmas "
                                     f"{[round(s, 6) for s in stored]}")
                if close[0] in positions:
                    raise ValueError(f"select: sigma {value:g} is asked for twice")
                positions.add(close[0])
            positions = sorted(positions)
            if not positions:
                raise ValueError("select: the list of sigmas is empty")
        view = copy.copy(self)
        base = list(range(len(stored))) if self._times is None else self._times
        view._times = [base[p] for p in positions]
        view.sigmas = self.sigmas[positions]
        view.saved_indices = [self.saved_indices[p] for p in positions]
        return view
