"""splitexit: early exits, split computing, CBNet and compression for edge inference."""

__version__ = "0.1.0"
