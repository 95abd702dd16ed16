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
