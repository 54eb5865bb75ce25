"""Checkpoints: the file format (`save`, `load`), the folders a run owns, the
checkpointing layer and resuming."""
