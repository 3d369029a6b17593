"""CI: check dist/ (run from outside the checkout with the fresh environment's Python).

The wheel: a manylinux tag, the compiled extension, py.typed and the license inside, and the
installed package imports from site-packages (not a checkout) with its extension and runs its
command line. The sdist: the license, the CUDA sources and every file of tests/.
Usage: python check_dist.py DIST_DIR (the checkout is DIST_DIR/..).
"""

import glob
import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile


def fail(msg):
    sys.exit(f"check_dist: {msg}")


def main(dist):
    checkout = os.path.dirname(os.path.abspath(dist))
    (wheel,) = glob.glob(os.path.join(dist, "*.whl")) or fail(f"no wheel in {dist}")
    (sdist,) = glob.glob(os.path.join(dist, "*.tar.gz")) or fail(f"no sdist in {dist}")

    name = os.path.basename(wheel)
    if "manylinux_" not in name:
        fail(f"{name}: no manylinux_* platform tag (auditwheel repair)")
    names = zipfile.ZipFile(wheel).namelist()
    for what, ok in (("the extension flowmatch_fast/_cuda_euler*.so",
                      any(n.startswith("flowmatch_fast/_cuda_euler") and n.endswith(".so")
                          for n in names)),
                     ("flowmatch_fast/py.typed", "flowmatch_fast/py.typed" in names),
                     ("the LICENSE", any(n.endswith("/LICENSE") for n in names))):
        if not ok:
            fail(f"{name} lacks {what}")

    import flowmatch_fast
    import flowmatch_fast._cuda_euler as ext

    site = sysconfig.get_paths()["purelib"]
    for module in (flowmatch_fast, ext):
        if not os.path.abspath(module.__file__).startswith(site):
            fail(f"{module.__name__} imported from {module.__file__}, not from {site}")
    version = subprocess.run([sys.executable, "-m", "flowmatch_fast", "--version"],
                             check=True, capture_output=True, text=True).stdout.strip()
    if version != f"flowmatch_fast {flowmatch_fast.__version__}":
        fail(f"--version printed {version!r}")
    subprocess.run([sys.executable, "-m", "flowmatch_fast", "info"], check=True)

    members = tarfile.open(sdist).getnames()
    root = members[0].split("/")[0]
    shipped = {m[len(root) + 1:] for m in members}
    wanted = ["LICENSE", "pyproject.toml", "setup.py", "README.md"]
    for folder in ("tests", "csrc"):
        wanted += [os.path.relpath(p, checkout)
                   for p in glob.glob(os.path.join(checkout, folder, "*"))
                   if os.path.isfile(p) and not p.endswith((".pyc", ".so"))]
    missing = sorted(set(wanted) - shipped)
    if missing:
        fail(f"{os.path.basename(sdist)} lacks {', '.join(missing)}")
    print(f"check_dist: {name} ({len(names)} files) and {os.path.basename(sdist)} "
          f"({len(shipped)} files) are complete; the wheel imports from {site}")


if __name__ == "__main__":
    main(sys.argv[1])
