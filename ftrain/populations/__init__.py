"""Populations: many models trained at once with `vmap`."""
