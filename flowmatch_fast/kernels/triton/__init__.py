"""The ``triton`` backend: :mod:`.launch` (availability, ``supports``, the steps and their
launch configuration) and :mod:`.jit` (the ``@triton.jit`` kernels, imported on first launch)."""
