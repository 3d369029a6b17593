"""flowmatch_fast: a drop-in, bitwise-faithful, fast flow-matching sampler for PyTorch.

``flowmatch_fast.FlowMatching`` (also ``flowmatch_fast.alpamayo_r1``) is Alpamayo-R1's class;
``flowmatch_fast.alpamayo1_5.FlowMatching`` is Alpamayo 1.5's; ``flowmatch_fast.convert(model)``
swaps them into a model already built with the originals.
"""

from . import alpamayo1_5, alpamayo_r1
from .backends import BACKENDS, available_backends
from .base import BaseDiffusion, StepFn
from .conversion import convert
from .flow_matching import FlowMatching

__all__ = ["FlowMatching", "BaseDiffusion", "StepFn", "BACKENDS", "available_backends",
           "alpamayo1_5", "alpamayo_r1", "convert"]
__version__ = "0.1.0"
