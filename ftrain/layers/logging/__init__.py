"""Seeing training: `with_logging`, the loggers (TensorBoard, CSV) and the progress bar."""

from ftrain.layers.logging import loggers
from ftrain.layers.logging.combinator import WithLogging, with_logging
from ftrain.layers.logging.loggers import CSV, Logger, TensorBoard

__all__ = ["CSV", "Logger", "TensorBoard", "WithLogging", "loggers", "with_logging"]
