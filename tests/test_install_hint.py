"""The fix named by the "extension not built" error fits how the package was installed."""

from __future__ import annotations

from flowmatch_fast import _install


def _package(root):
    package = root / "flowmatch_fast"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    return str(package)


def test_source_checkout_gets_an_editable_rebuild_in_that_checkout(tmp_path):
    package = _package(tmp_path)
    (tmp_path / "setup.py").write_text("")
    (tmp_path / "csrc").mkdir()
    assert _install.install_kind(package) == "source checkout"
    hint = _install.rebuild_hint(package_dir=package)
    assert f"cd {tmp_path} && python -m pip install --no-build-isolation -e ." in hint


def test_wheel_install_is_not_told_to_run_an_editable_install(tmp_path):
    package = _package(tmp_path / "site-packages")
    (tmp_path / "site-packages" / "flowmatch_fast-0.1.0.dist-info").mkdir()
    assert _install.install_kind(package) == "wheel"
    hint = _install.rebuild_hint(package_dir=package)
    assert "-e ." not in hint
    assert "wheel" in hint and "make dist" in hint and ".tar.gz" in hint


def test_environment_prefix_is_part_of_the_command(tmp_path):
    package = _package(tmp_path)
    (tmp_path / "setup.py").write_text("")
    (tmp_path / "csrc").mkdir()
    hint = _install.rebuild_hint("FLOWMATCH_FAST_CUDA_ARCHS=90", package_dir=package)
    assert "FLOWMATCH_FAST_CUDA_ARCHS=90 python -m pip install --no-build-isolation -e ." in hint
    wheel = _package(tmp_path / "site")
    assert "FLOWMATCH_FAST_CUDA_ARCHS=90 python -m pip install" in _install.rebuild_hint(
        "FLOWMATCH_FAST_CUDA_ARCHS=90", package_dir=wheel)
