"""The loops that drive a step over data: `iterate`, `fit`, `evaluate`, `predict`."""
