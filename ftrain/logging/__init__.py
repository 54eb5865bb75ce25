"""Seeing training: `with_logging`, the loggers (TensorBoard, CSV) and the progress bar."""

from ftrain.logging import loggers
from ftrain.logging.combinator import WithLogging, with_logging
from ftrain.logging.loggers import CSV, Logger, TensorBoard

__all__ = ["CSV", "Logger", "TensorBoard", "WithLogging", "loggers", "with_logging"]
