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


def test_the_cuda_backend_names_that_fix_when_not_built(monkeypatch):
    from flowmatch_fast.kernels.cuda import loader

    monkeypatch.setattr(loader, "_ext", None)
    monkeypatch.setattr(loader, "_import_error", ImportError("No module named 'x'"))
    assert _install.rebuild_hint() in loader.unavailable_reason("cuda")


def test_the_cuda_backend_names_that_fix_with_the_arch_for_a_gpu_it_has_no_code_for(monkeypatch):
    import torch

    from flowmatch_fast.kernels.cuda import loader

    class Ext:
        @staticmethod
        def compiled_archs():
            return ["sm_80", "sm_90", "compute_90"]

    monkeypatch.setattr(loader, "_arch_reasons", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (7, 5))
    reason = loader._arch_reason(Ext, torch.device("cuda", 0))
    assert "sm_75" in reason and "sm_80, sm_90, compute_90" in reason
    assert _install.rebuild_hint("FLOWMATCH_FAST_CUDA_ARCHS=75") in reason
