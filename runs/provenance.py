"""Where a result came from: the command line, the git commit (and whether the tree had uncommitted changes),
package versions, the device and the host. Every run directory gets `provenance.json` (one record per start, so a
resumed run lists each), and the benches put the same record in their JSON results."""
import json
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "torchvision", "numpy", "scipy", "neuraloperator", "timm", "lpips", "xformers")
ROOT = Path(__file__).resolve().parents[1]


def git_state(root=ROOT):
    """{"commit", "dirty"} of the checkout holding the code, or {"commit": None} outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None}
        status = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}


def versions():
    """Installed versions of the packages results depend on (absent ones left out)."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def device_description(device=None):
    import torch
    if device is not None and torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name(torch.device(device))} (cuda)"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def provenance(device=None, seed=None, argv=None):
    """One record (plain JSON values)."""
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": list(sys.argv if argv is None else argv),
              "git": git_state(), "versions": versions(), "device": device_description(device),
              "host": platform.node()}
    if seed is not None:
        record["seed"] = seed
    return record


def record_provenance(run_dir, device=None, seed=None):
    """Append this start's record to <run_dir>/provenance.json."""
    path = Path(run_dir) / "provenance.json"
    records = json.loads(path.read_text()) if path.exists() else []
    records.append(provenance(device, seed))
    path.write_text(json.dumps(records, indent=1) + "\n")
