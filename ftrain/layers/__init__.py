"""Outer layers: logging, validation, early stopping, hooks, profiling. Each owns one slot
and talks to the others and to the loop only through metrics and requests."""
