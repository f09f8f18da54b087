"""The distiller wrapped for data-parallel training: DistributedDataParallel around one
training step, with global BatchNorm."""

from __future__ import annotations

import torch
from torch import nn

from .batchnorm import convert_batchnorm
from .process_group import world_size


class _Step(nn.Module):
    """What DDP wraps: the distiller's forward with the logits detached, so DDP looks
    for gradients only where the losses come from (AB's first phase returns logits that
    no loss uses)."""

    def __init__(self, distiller: nn.Module):
        super().__init__()
        self.distiller = distiller

    def forward(self, x, y, **kwargs):  # kwargs: e.g. index=, for a Distiller that wants_indices
        logits, losses = self.distiller(x, y, **kwargs)
        return logits.detach(), losses


def wrap(distiller: nn.Module, device: torch.device) -> tuple[nn.Module, list[nn.Module]]:
    """-> (the module to call for a training step, the converted BatchNorms).

    In one process: the distiller itself. In a process group: DistributedDataParallel
    over the student and connectors with global BatchNorm; the frozen teachers are
    replicated as they are (every rank loads the same checkpoint), never broadcast or
    all-reduced. A method whose losses leave some trainable parameters out in some steps
    (AB: its connectors after the first phase) says so with ``leaves_parameters_unused``;
    DDP then looks for them every step (a graph traversal the others do not pay)."""
    if world_size() == 1:
        return distiller, []
    from torch.nn.parallel import DistributedDataParallel

    converted = []
    for name, child in distiller.named_children():
        if name != "teachers":
            converted += convert_batchnorm(child)
    step = _Step(distiller)
    frozen = [f"distiller.{n}" for n, _ in [*distiller.named_parameters(), *distiller.named_buffers()]
              if n.startswith("teachers.")]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(step, frozen)
    # No buffer sync per step: GlobalBatchNorm2d updates the running statistics
    # identically on every rank, so re-sending them before every step would buy nothing.
    ddp = DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None,
                                  forward_sync_buffers=False,
                                  find_unused_parameters=bool(getattr(distiller, "leaves_parameters_unused", False)))
    return ddp, converted


# ------------------------------------------------------------------ launching
