"""Pieces the benchmark scripts share (imported as a sibling: `python benchmarks/x.py`
puts this folder on the path). The hand-written loops stay in each script, in full."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]


def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy of a classifier on an (inputs, labels) batch."""
    x, y = batch
    return F.cross_entropy(model(x), y)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so wall times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- a GPT-style model (compile.py and gpu.py time it on CUDA) --------------------------

class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A small GPT-style language model (pre-norm blocks, causal attention)."""

    def __init__(self, vocab: int = 4096, seq: int = 128, d: int = 256, layers: int = 4,
                 heads: int = 4) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos(pos))))


class Batches:
    """A list of batches seen as one iterable (Lightning takes a bare list for several
    dataloaders); iterating it costs what iterating the list costs."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches

    def __iter__(self) -> Any:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (e.g. "VmHWM": peak RSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")
