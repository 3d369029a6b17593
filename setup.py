"""Build script: the pure-Python package always; the CUDA extension when nvcc is found.

(The CUDA build is filled in by the csrc/ work; this placeholder installs the Python package.)
"""
from setuptools import setup

setup()
