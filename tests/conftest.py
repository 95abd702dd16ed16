import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)  # many small ops: one thread is fastest and immune to a busy machine


@pytest.fixture
def run_cli(tmp_path):
    """Run `python -m MODULE ARGS` in a subprocess from the repo root; returns CompletedProcess."""
    import subprocess

    def run(module, *args, env=None, timeout=600):
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "FASTDIFF_CACHE": str(tmp_path / "cache"), **(env or {})}
        return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=full_env,
                              capture_output=True, text=True, timeout=timeout)
    return run


@pytest.fixture(scope="session")
def mnist():
    from data import DATASETS
    return DATASETS["mnist"]()


@pytest.fixture(scope="session")
def tiny_net(mnist):
    """An MNIST classifier trained for two epochs on 1,000 digits (64 steps, a few seconds; about 86 % accurate):
    enough to check that training learns and that the metrics built on its features rank samples."""
    import types
    from metrics.mnist_net import train_mnist_classifier
    subset = types.SimpleNamespace(images=mnist.images[:1300], labels=mnist.labels[:1300])
    return train_mnist_classifier(subset, epochs=2, seed=0, heldout=300, batch=32, lr=5e-3)
