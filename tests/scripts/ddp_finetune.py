"""Fine-tuning under torchrun (tests/test_finetune.py): a frozen backbone unfrozen by an
`ft.every` hook mid-run, with `with_ddp`; each rank saves its final params.

usage: ddp_finetune.py OUT BATCH MAX_STEPS UNFREEZE_AT [OPTIMIZER]
OPTIMIZER: adam (ft.optim.adam, the default) or rmsprop (ft.optim.from_torch of
torch.optim.RMSprop with momentum: a torch optimizer under with_ddp).
"""

import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ftrain as ft


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(5, 16), nn.Tanh())
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def main() -> None:
    out, batch, max_steps, at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
        int(sys.argv[4])
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 5, generator=g)
    y = (x.sum(1) > 0).long()
    data = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)
    which = sys.argv[5] if len(sys.argv) > 5 else "adam"
    opt = ft.optim.adam(1e-2) if which == "adam" else ft.optim.from_torch(
        torch.optim.RMSprop, lr=1e-2, momentum=0.9)
    state = ft.TrainState.create(Net(), opt, seed=3).freeze("backbone.*")

    def unfreeze(s, metrics):
        if s.step == at:
            return s.unfreeze("backbone.*", lr=1e-3)
        return None

    step = ft.with_ddp(ft.train_step(
        lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])))
    step = ft.every(step, unfreeze, every_n_steps=1)
    state = ft.fit(step, state, data, max_steps=max_steps, logger=False, checkpoint=False,
                   progress=False)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    trained = (state.opt_state["adam"]["exp_avg"] if which == "adam"
               else state.opt_state["rmsprop"]["state"]["square_avg"])
    torch.save({"params": state.params, "trained": sorted(trained)}, f"{out}/rank{rank}.pt")


if __name__ == "__main__":
    main()
