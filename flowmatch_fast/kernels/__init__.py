"""The update steps of every backend, behind one contract (:mod:`.contract`).

- :mod:`.contract`: the time grid, dtype promotion, :class:`~.contract.Stage` and
  :class:`~.contract.Guidance`, the step signatures.
- :mod:`.reference`: the plain-torch steps, the oracle and the CPU path.
- :mod:`.triton`: the Triton backend (``launch``: supports, steps, launches; ``jit``: kernels).
- :mod:`.cuda`: the compiled extension's backend (``loader``: import, availability, arch rules;
  ``launch``: supports, steps, host checks, launches into csrc/).
"""

from .contract import Guidance, Stage, TimeGrid, result_dtype

__all__ = ["Guidance", "Stage", "TimeGrid", "result_dtype"]
