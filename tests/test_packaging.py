"""What ships: the sdist holds the tests with their helpers, the CUDA sources and the license;
the license metadata is the SPDX string (no setuptools deprecation warning); py.typed is there.

The wheel's contents (the extension, py.typed, a manylinux tag) are checked by ``make
dist-check`` (.ci/check_dist.py), which builds it.
"""

from __future__ import annotations

import importlib.resources
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_package_ships_py_typed():
    assert importlib.resources.files("flowmatch_fast").joinpath("py.typed").is_file()


def test_every_package_directory_is_listed_for_the_wheel():
    tomllib = pytest.importorskip("tomllib")
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found = {".".join(Path(d).relative_to(ROOT).parts)
             for d, _, files in os.walk(ROOT / "flowmatch_fast") if "__init__.py" in files}
    assert sorted(listed) == sorted(found)


def test_license_file_and_spdx_metadata():
    tomllib = pytest.importorskip("tomllib")
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]


def test_sdist_holds_the_tests_their_helpers_the_sources_and_the_license(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} < 77 reads no SPDX license string")
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path),
         "sdist", "--dist-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, FLOWMATCH_FAST_SKIP_CUDA_BUILD="1"),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Deprecat" not in proc.stderr, proc.stderr  # e.g. the license table form
    (sdist,) = tmp_path.glob("*.tar.gz")
    names = tarfile.open(sdist).getnames()
    shipped = {name.split("/", 1)[1] for name in names if "/" in name}
    wanted = {"LICENSE", "setup.py", "pyproject.toml", "README.md", "flowmatch_fast/py.typed"}
    for folder, pattern in (("tests", "*.py"), ("csrc", "*")):
        wanted |= {str(p.relative_to(ROOT)) for p in (ROOT / folder).glob(pattern) if p.is_file()}
    assert {"tests/conftest.py", "tests/oracle.py", "tests/fields.py"} <= wanted
    assert sorted(wanted - shipped) == []
