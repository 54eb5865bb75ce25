"""The one way ftrain reads device values on the host: all at once, one transfer.

Every host read in ftrain goes through `to_host`, at points that must look anyway (a
logging interval, a progress refresh, an epoch end, a validation check), so the number of
syncs per run is known and testable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_host(values: Sequence[torch.Tensor | float | int]) -> list[float]:
    """The values as Python floats, read in one device-to-host transfer (host sync here)."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return [float(v) for v in values]  # type: ignore[arg-type]
    device = tensors[0].device
    stacked = torch.stack([v.detach().to(device=device, dtype=torch.float64).reshape(())
                           if isinstance(v, torch.Tensor)
                           else torch.tensor(float(v), dtype=torch.float64, device=device)
                           for v in values])
    return stacked.cpu().tolist()  # type: ignore[no-any-return]
