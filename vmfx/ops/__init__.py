"""Numeric ops: the selective scan and the quantization primitives. Imports only torch."""

from .selective_scan import selective_scan

__all__ = ["selective_scan"]
