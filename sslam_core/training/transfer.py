"""Host-to-device copies that do not wait for the GPU.

A plain `tensor.to("cuda")` from ordinary (pageable) host memory blocks the host until every kernel
already queued has run. The pre-training step makes its masks, windows and mixing partners on the
CPU (so that a seeded run is the same on any device) and moved them that way, several times a step:
each move made the host wait, so it could not queue the rest of the step while the GPU worked.
Through page-locked memory and a non-blocking copy the host goes on at once; the copy still runs in
stream order, before the kernels that use it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def to_device(t: Tensor, device: torch.device | str) -> Tensor:
    """`t` on `device`; a CPU tensor goes to a GPU without waiting (pinned, non-blocking)."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


__all__ = ["to_device"]
