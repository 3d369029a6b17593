"""How this copy of flowmatch_fast was installed, and so how to (re)build its CUDA extension.

A source checkout (a plain clone, or ``pip install -e .``, which imports from the checkout) has
``setup.py`` and ``csrc/`` next to the package: the fix is an editable rebuild there. Anything
else came from a wheel (or an sdist built into one) in site-packages: an editable install means
nothing there; the fix is a wheel that holds the extension or a build from source with nvcc.
"""

from __future__ import annotations

import os
from typing import Optional

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def source_root(package_dir: str = PACKAGE_DIR) -> Optional[str]:
    """The checkout the package is imported from, or ``None`` when it is an installed wheel."""
    root = os.path.dirname(package_dir)
    if os.path.isfile(os.path.join(root, "setup.py")) and os.path.isdir(os.path.join(root, "csrc")):
        return root
    return None


def install_kind(package_dir: str = PACKAGE_DIR) -> str:
    """``"source checkout"`` (a clone or an editable install) or ``"wheel"``."""
    return "wheel" if source_root(package_dir) is None else "source checkout"


def rebuild_hint(env: str = "", package_dir: str = PACKAGE_DIR) -> str:
    """The command that builds the extension for this installation; ``env`` prefixes it
    (e.g. ``"FLOWMATCH_FAST_CUDA_ARCHS=90"``)."""
    prefix = f"{env} " if env else ""
    root = source_root(package_dir)
    if root is not None:
        return (f"rebuild it with nvcc on PATH: cd {root} && "
                f"{prefix}python -m pip install --no-build-isolation -e .")
    return ("this flowmatch_fast is an installed wheel without a usable extension: install a "
            "wheel that has one (`make dist` builds a manylinux wheel for every torch >= 2.4), or "
            f"build it from the sdist with nvcc on PATH: {prefix}python -m pip install "
            "--force-reinstall --no-deps flowmatch_fast-<version>.tar.gz")
