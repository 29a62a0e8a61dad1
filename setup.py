"""Maps the top-level `kernels/` and `patches/` folders into the kvmem namespace.

Generic top-level names such as `kernels` would clash with other installed packages, so they install as
`kvmem.kernels` and `kvmem.patches`. Everything else lives in pyproject.toml.
"""

from setuptools import setup

setup(
    packages=["kvmem", "kvmem.kernels", "kvmem.patches"],
    package_dir={"kvmem": "kvmem", "kvmem.kernels": "kernels", "kvmem.patches": "patches"},
    package_data={"kvmem": ["data/*.txt"]},
)
