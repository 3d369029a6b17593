"""Alpamayo-R1's sampler under its own name, mirroring ``alpamayo_r1.diffusion.flow_matching``:
``from flowmatch_fast.alpamayo_r1 import FlowMatching`` is ``flowmatch_fast.FlowMatching``."""

from .base import BaseDiffusion, StepFn
from .flow_matching import FlowMatching

__all__ = ["BaseDiffusion", "FlowMatching", "StepFn"]
