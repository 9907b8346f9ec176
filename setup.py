"""Build script: the Python packages, with kernels/ installed as fastattn.kernels.

The CUDA extension fastattn._C is added here once csrc/ holds sources (see DESIGN.md).
"""

from setuptools import setup

setup(
    packages=["fastattn", "fastattn.ops", "fastattn.launchers", "fastattn.models", "fastattn.kernels"],
    package_dir={"fastattn.kernels": "kernels"},
)
