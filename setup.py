"""Package list and data for setuptools; everything else lives in pyproject.toml.

`kernels` and `patches` live inside the package (kvmem/kernels, kvmem/patches): as top-level folders of a source
checkout they shadowed HuggingFace's own `kernels` package (a dependency of transformers >= 5.25) whenever the
checkout's root was on sys.path (`python -m pytest`, a REPL or a bench script started there).
"""

from setuptools import setup

setup(
    packages=["kvmem", "kvmem.kernels", "kvmem.patches", "kvmem.integrations"],
    package_data={"kvmem": ["data/*.txt"]},
)
