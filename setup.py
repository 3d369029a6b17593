"""Build script: the pure-Python package always; the CUDA extension when nvcc is found.

The extension ``flowmatch_fast._cuda_euler`` (csrc/euler_kernel.cu, csrc/stage_kernel.cu, their
shared headers, and csrc/binding.cpp) is built with nvcc through ninja, both build requirements
(the ``ninja`` package's binary). It links only the static CUDA runtime, never torch, so one
build serves every torch version. Package metadata and the package list live in pyproject.toml.

Environment:

- ``FLOWMATCH_FAST_SKIP_CUDA_BUILD=1``: do not build the extension (one line says so); the
  pure-Python package still installs and backend="cuda" reports itself unavailable.
- ``FLOWMATCH_FAST_CUDA_ARCHS``: compute capabilities to build for, separated by ``;``, ``,``
  or spaces. Each entry is ``90`` or ``9.0`` (machine code, SASS, for sm_90), optionally with an
  arch suffix (``90a``, ``100f``) and/or ``+PTX`` (``9.0+PTX``) to also embed PTX for it, which
  newer GPUs JIT-compile. Without any ``+PTX`` entry, PTX of the highest plain arch is embedded.
  Default ``80;90``: sm_80 + sm_90 SASS and compute_90 PTX.
- ``CUDA_HOME`` / ``CUDA_PATH``: the toolkit to use; else ``nvcc`` on PATH; else /usr/local/cuda.
- ``MAX_JOBS``: parallel compile jobs (default: the CPU count).

A failing compile fails the install (CI must catch a broken kernel) unless the skip is set.
Nothing here touches the network.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

from packaging.version import Version

ROOT = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "flowmatch_fast._cuda_euler"
# The two kernel files compile in parallel (ninja runs them side by side).
KERNEL_SOURCES = tuple(os.path.join("csrc", f"{k}_kernel.cu") for k in ("euler", "stage", "sde"))
HEADERS = tuple(os.path.join("csrc", h) for h in ("api.h", "common.cuh", "launch.cuh"))
BINDING_SOURCE = os.path.join("csrc", "binding.cpp")
SKIP_ENV = "FLOWMATCH_FAST_SKIP_CUDA_BUILD"
ARCHS_ENV = "FLOWMATCH_FAST_CUDA_ARCHS"
DEFAULT_ARCHS = "80;90"
MIN_NVCC = Version("11.8")  # first release with sm_90
# setup.py commands that build; the skip line is printed only for these (pip also runs
# setup.py for metadata, which should stay quiet).
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def find_nvcc():
    """nvcc of $CUDA_HOME / $CUDA_PATH if set, else the one on PATH, else /usr/local/cuda's."""
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            candidates.append(os.path.join(home, "bin", "nvcc"))
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(on_path)
    candidates.append("/usr/local/cuda/bin/nvcc")
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def skip_reason():
    """Why the extension is not built, or None when it is."""
    if _env_true(SKIP_ENV):
        return f"{SKIP_ENV}=1"
    if find_nvcc() is None:
        return "nvcc not found ($CUDA_HOME/bin, PATH, /usr/local/cuda/bin)"
    return None


# ---------------------------------------------------------------------------------- archs
_ARCH_RE = re.compile(r"^(?:sm_|compute_)?(\d+)(?:\.(\d+))?([af]?)(\+ptx)?$", re.IGNORECASE)


def parse_archs(spec: str):
    """``"80;9.0+PTX;90a"`` -> gencode flags and the list of embedded targets."""
    entries = []
    for raw in re.split(r"[;,\s]+", spec.strip()):
        if not raw:
            continue
        m = _ARCH_RE.match(raw)
        if m is None:
            raise ValueError(
                f"{ARCHS_ENV}: cannot read {raw!r}; use entries like 80, 9.0, 90a or 9.0+PTX"
            )
        major, minor, suffix, ptx = m.groups()
        number = int(major) * 10 + int(minor) if minor is not None else int(major)
        entries.append((number, suffix.lower(), True, bool(ptx)))  # (arch, suffix, sass, ptx)
    if not entries:
        raise ValueError(f"{ARCHS_ENV} is empty")
    if not any(e[3] for e in entries):
        # PTX of the highest arch keeps newer GPUs working (the driver JIT-compiles it); the
        # plain arch, since arch-specific ('a'/'f') PTX would not run on them.
        entries.append((max(e[0] for e in entries), "", False, True))
    flags, targets = [], []
    for number, suffix, sass, ptx in entries:
        arch = f"{number}{suffix}"
        if sass and f"sm_{arch}" not in targets:
            flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
            targets.append(f"sm_{arch}")
        if ptx and f"compute_{arch}" not in targets:
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
            targets.append(f"compute_{arch}")
    return flags, targets


def nvcc_version(nvcc: str) -> Version:
    out = subprocess.run([nvcc, "--version"], check=True, capture_output=True, text=True).stdout
    m = re.search(r"release \S+, V(\d+(?:\.\d+)*)", out) or re.search(r"release (\d+\.\d+)", out)
    if m is None:
        raise RuntimeError(f"cannot read the CUDA version from `{nvcc} --version`:\n{out}")
    return Version(m.group(1))


def check_archs_supported(nvcc: str, targets):
    """Fail early, with the list, when nvcc cannot build one of the requested archs."""
    try:
        listed = subprocess.run(
            [nvcc, "--list-gpu-code"], check=True, capture_output=True, text=True
        ).stdout.split()
    except (subprocess.CalledProcessError, OSError):
        return  # older nvcc without the listing: let the compile report it
    known = {re.sub(r"[af]$", "", t) for t in listed if t.startswith("sm_")}
    for target in targets:
        sm = "sm_" + re.sub(r"[af]$", "", target.split("_", 1)[1])
        if sm not in known:
            raise RuntimeError(
                f"{nvcc} cannot build {target} (it knows {' '.join(sorted(known))}); "
                f"set {ARCHS_ENV} to a supported list or use a newer CUDA toolkit"
            )


# ---------------------------------------------------------------------------------- build
def _ninja_escape_path(path: str) -> str:
    return path.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def _command(args) -> str:
    return " ".join(shlex.quote(a) for a in args).replace("$", "$$")


class CudaExtension(Extension):
    """Marker: built by NvccBuildExt.build_extension, not by distutils' compiler."""


class NvccBuildExt(build_ext):
    def build_extension(self, ext):
        if not isinstance(ext, CudaExtension):
            return super().build_extension(ext)
        try:
            self._build_cuda(ext)
        except Exception as exc:
            raise RuntimeError(
                f"building the CUDA extension {EXT_NAME} failed: {exc}\n"
                f"(set {SKIP_ENV}=1 to install the pure-Python package without the cuda backend)"
            ) from exc

    def _build_cuda(self, ext):
        nvcc = find_nvcc()
        version = nvcc_version(nvcc)
        if version < MIN_NVCC:
            raise RuntimeError(f"{nvcc} is CUDA {version}; CUDA >= {MIN_NVCC} is needed (sm_90)")
        flags, targets = parse_archs(os.environ.get(ARCHS_ENV, "") or DEFAULT_ARCHS)
        check_archs_supported(nvcc, targets)
        try:
            import pybind11
        except ImportError as exc:
            raise RuntimeError("pybind11 is needed to build the extension: pip install pybind11") from exc

        output = os.path.abspath(self.get_ext_fullpath(ext.name))
        build_dir = os.path.abspath(os.path.join(self.build_temp, "flowmatch_fast_cuda"))
        os.makedirs(build_dir, exist_ok=True)
        os.makedirs(os.path.dirname(output), exist_ok=True)
        jobs = int(os.environ.get("MAX_JOBS", "0") or 0) or (os.cpu_count() or 1)

        arch_macro = "-DFMF_ARCH_LIST=\"" + ";".join(targets) + "\""
        includes = [
            f"-I{pybind11.get_include()}",
            f"-I{sysconfig.get_paths()['include']}",
        ]
        platinclude = sysconfig.get_paths().get("platinclude")
        if platinclude and platinclude != sysconfig.get_paths()["include"]:
            includes.append(f"-I{platinclude}")
        common = [
            "-std=c++17", "-Xcompiler=-fPIC", "-Xcompiler=-fvisibility=hidden", arch_macro,
            # The host emulation runs the kernels' code on the CPU: no contraction into FMA there
            # either (GCC contracts by default wherever the target has FMA, e.g. AArch64).
            "-Xcompiler=-ffp-contract=off",
        ]
        kernel_flags = [
            *common, "-O3",
            # No FMA contraction anywhere (the kernels' intrinsics already forbid it there), and
            # IEEE behaviour (denormals kept, exact division/sqrt): bitwise parity with PyTorch.
            "-fmad=false", "-ftz=false", "-prec-div=true", "-prec-sqrt=true",
            # Compile the arch targets in parallel inside nvcc.
            f"--threads={max(1, min(len(flags), jobs))}",
            *flags,
        ]
        # (command, source, object) of each compile; binding.cpp is host C++, which nvcc hands to
        # the host compiler with the CUDA include path.
        compiles = []
        for source in KERNEL_SOURCES:
            obj = os.path.join(build_dir, os.path.splitext(os.path.basename(source))[0] + ".o")
            src = os.path.join(ROOT, source)
            compiles.append(([nvcc, "-c", src, "-o", obj, *kernel_flags], src, obj))
        binding_obj = os.path.join(build_dir, "binding.o")
        binding_src = os.path.join(ROOT, BINDING_SOURCE)
        compiles.append(([nvcc, "-c", binding_src, "-o", binding_obj, *common, "-O2", *includes],
                         binding_src, binding_obj))
        link = [
            nvcc, "-shared", *(obj for _, _, obj in compiles), "-o", output,
            "-cudart=static", "-ldl", "-lrt", "-lpthread",
            # Keep the static runtime's symbols private, so that calls inside the module can never
            # bind to the libcudart that torch loads into the process.
            "-Xlinker=--exclude-libs=ALL",
        ]
        print(f"flowmatch_fast: building {EXT_NAME} with {nvcc} (CUDA {version}) for "
              f"{' '.join(targets)}", file=sys.stderr)
        self._run_ninja(build_dir, jobs, compiles, link, output)

    @staticmethod
    def _run_ninja(build_dir, jobs, compiles, link, output):
        e = _ninja_escape_path
        headers = " ".join(e(os.path.join(ROOT, h)) for h in HEADERS)
        lines = ["ninja_required_version = 1.3"]
        for n, (cmd, src, obj) in enumerate(compiles):
            lines += [
                f"rule compile_{n}",
                f"  command = {_command(cmd)}",
                f"  description = nvcc {os.path.basename(src)}",
                # The headers are implicit inputs, so that editing one rebuilds.
                f"build {e(obj)}: compile_{n} {e(src)} | {headers}",
            ]
        lines += [
            "rule link",
            f"  command = {_command(link)}",
            "  description = link _cuda_euler",
            f"build {e(output)}: link {' '.join(e(obj) for _, _, obj in compiles)}",
            f"default {e(output)}",
            "",
        ]
        with open(os.path.join(build_dir, "build.ninja"), "w") as f:
            f.write("\n".join(lines))
        import ninja  # a build requirement (pyproject.toml); imported here, where it is needed

        ninja_bin = os.path.join(ninja.BIN_DIR, "ninja")
        subprocess.run([ninja_bin, "-C", build_dir, "-j", str(jobs)], check=True)


SKIP_REASON = skip_reason()
if SKIP_REASON is not None and BUILD_COMMANDS.intersection(sys.argv[1:]):
    print(f"flowmatch_fast: not building the CUDA extension ({SKIP_REASON}); "
          f"installing the pure-Python package, backend='cuda' will be unavailable",
          file=sys.stderr)

setup(
    ext_modules=[] if SKIP_REASON else [
        # depends: the shared header goes into an sdist and marks the sources it feeds.
        CudaExtension(EXT_NAME, sources=[*KERNEL_SOURCES, BINDING_SOURCE], depends=list(HEADERS))],
    cmdclass={"build_ext": NvccBuildExt},
)
