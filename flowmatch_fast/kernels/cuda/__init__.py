"""The ``cuda`` backend: the compiled kernels of csrc/ (the extension
``flowmatch_fast._cuda_euler``).

- :mod:`.loader`: importing the extension, availability, the arch rules, the host emulation switch.
- :mod:`.launch`: ``supports``, the steps, and their launches (host checks, the stream).
"""
