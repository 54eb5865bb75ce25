"""Whole-step compilation (`ft.compile`)."""
