"""The update steps of every backend, behind one contract (:mod:`.contract`).

- :mod:`.contract`: the time grid, dtype promotion, :class:`~.contract.Stage` and
  :class:`~.contract.Guidance`, the step signatures.
- :mod:`.reference`: the plain-torch steps, the oracle and the CPU path.
- :mod:`.triton_euler` (launchers) and :mod:`._triton_kernels` (``@triton.jit``): the Triton kernels.
- :mod:`.cuda_euler`: the launchers of the compiled extension (csrc/).
"""

from .contract import Guidance, Stage, TimeGrid, result_dtype

__all__ = ["Guidance", "Stage", "TimeGrid", "result_dtype"]
