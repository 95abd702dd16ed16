"""Checkpoints: plain dicts of tensors and python values, written atomically, read with weights_only=True.

A checkpoint holds {"format", "step", "config", "networks", "ema", "optimizers", "scaler", "rng"}; nothing in it is a
pickled module or class, so loading never executes code from the file.
"""
import os
from pathlib import Path

import torch

FORMAT = "fastdiff-checkpoint-v1"


def save_checkpoint(state, path):
    """Write to a temporary file in the same directory, fsync, then rename over `path`: a crash or a kill at any
    moment leaves either the old checkpoint or the new one, never a torn file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path, map_location="cpu"):
    """The checkpoint dict at `path` (a file, or a run directory holding checkpoint.pt)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for torn or foreign files
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a readable checkpoint (truncated or corrupt?): {first_line}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} checkpoint")
    return state


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
