"""Canonical modules: every supported model is expressed with these before tracing."""

from .mamba import MambaMixer
from .norm import RMSNorm
from .mambavision import ConcatMambaMixer, WindowedStage

__all__ = ["MambaMixer", "RMSNorm", "ConcatMambaMixer", "WindowedStage"]
