"""Data parallelism over torch.distributed: the process group, `with_ddp`, and the
lockstep exchange that keeps ranks on the same step."""
