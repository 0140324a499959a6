"""Canonical modules: every supported model is expressed with these before tracing."""

from .mamba import MambaMixer
from .norm import RMSNorm

__all__ = ["MambaMixer", "RMSNorm"]
