"""What a run logs: metrics.jsonl and TensorBoard, on the main process only."""
import json


class Logger:
    """metrics.jsonl (truncated to `start_step` on resume, so a killed run leaves no duplicate lines) and
    TensorBoard, on the main process only."""

    def __init__(self, run_dir, start_step, enabled=True):
        self.enabled = enabled
        if not enabled:
            return
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.file = open(self.path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(run_dir / "tensorboard", purge_step=start_step or None)
        except ImportError:  # tensorboard is a dependency; tolerate its absence in stripped-down installs
            self.tb = None

    def write(self, record):
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step":
                    self.tb.add_scalar(key, value, record["step"])

    def close(self):
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()
