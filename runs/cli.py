"""What every command-line entry point shares: bad input becomes one line on stderr and exit code 2."""
import argparse
import contextlib
import os
import sys


@contextlib.contextmanager
def cli_errors():
    """Turn ValueError / FileNotFoundError into `error: ...` and exit 2; FASTDIFF_DEBUG=1 shows the traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:  # ImportError: a missing extra
        if os.environ.get("FASTDIFF_DEBUG"):
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def pick_device(name="auto", local_rank=0):
    import torch
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
    return device


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `error: ...`, and exit 2 (the usage is under --help)."""

    def error(self, message):
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def positive_int(text):
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return value


def non_negative_float(text):
    """An argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number >= 0") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number >= 0")
    return value
