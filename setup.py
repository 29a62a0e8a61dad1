"""Package list and data for setuptools; everything else lives in pyproject.toml.

Every sub-package of kvmem is found (a new folder needs no entry here). `kernels` lives inside the package: as a
top-level folder of a source checkout it shadowed HuggingFace's own `kernels` package (a dependency of
transformers >= 5.25) whenever the checkout's root was on sys.path (`python -m pytest`, a REPL, a bench script).
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["kvmem", "kvmem.*"]),
    package_data={"kvmem": ["py.typed"], "kvmem.demo": ["data/*.txt"], "kvmem.kernels": ["cpu_decode.cpp"]},
)
