"""flowmatch_fast: a drop-in, bitwise-faithful, fast flow-matching sampler for PyTorch."""

from .backends import BACKENDS, available_backends
from .base import BaseDiffusion, StepFn
from .flow_matching import FlowMatching

__all__ = ["FlowMatching", "BaseDiffusion", "StepFn", "BACKENDS", "available_backends"]
__version__ = "0.1.0"
