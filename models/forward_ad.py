"""Forward-mode derivatives of a network in time (sCM's tangent dF/dt, MeanFlow's du/dt), taken safely.

Lu & Song 2024 and Geng et al. 2025 differentiate the student along the ODE by forward-mode AD (torch.func.jvp). What
breaks it (shared/METHODS-consistency-matching.md, pitfalls 6 and 7), and what `time_jvp` does about each:
- DDP: jvp cannot run through a DistributedDataParallel module, and a graded pass on the unwrapped module would skip
  the gradient all-reduce silently. The jvp here is a stop-gradient target: callers take it on the unwrapped module,
  under no_grad, and keep their graded pass through the wrapper (tested with 2-process gloo runs).
- Fused attention: SDPA's flash / memory-efficient / CPU-fused kernels have no forward-mode derivative, so SDPA is
  held to its math kernel inside (the U-Net's attention calls SDPA; DiT's "auto" path switches to its own math
  attention when it sees a tangent). An op without a forward derivative is a one-line ValueError naming the fix.
- Precision: autocast is off inside, so tangents are float32 under a bf16 run (a bf16 tangent is noise or NaN).
"""
import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def full_precision(device):
    """Autocast off on `device` (float32 maths inside a bf16 / fp16 autocast region)."""
    return torch.autocast(torch.device(device).type, enabled=False)


@contextlib.contextmanager
def forward_ad_safe(device):
    """no_grad, autocast off and SDPA held to its math kernel (the one with forward-mode AD)."""
    with torch.no_grad(), full_precision(device), sdpa_kernel([SDPBackend.MATH]):
        yield


def time_jvp(fn, primals, tangents, who):
    """torch.func.jvp(fn, primals, tangents) -> (fn(primals), its derivative along tangents), under forward_ad_safe;
    a backbone op without a forward derivative is a one-line ValueError (prefixed by `who`)."""
    with forward_ad_safe(primals[0].device):
        try:
            return torch.func.jvp(fn, primals, tangents)
        except (NotImplementedError, RuntimeError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            if isinstance(error, RuntimeError) and not any(
                    word in reason for word in ("forward AD", "forward-mode", "jvp", "functorch")):
                raise
            raise ValueError(f"{who} differentiates the student in time by forward-mode AD (torch.func.jvp), and an op "
                             f"of its backbone has none ({reason}); use a path with forward AD (dit: attention='auto' "
                             "or 'math'; SDPA is already held to its math kernel here)") from None
