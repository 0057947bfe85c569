"""Package discovery; everything else is in pyproject.toml.

The repository root is the package ``kd_pipeline`` (its folders ``cache/`` and ``train/`` are its subpackages), so
that site-packages gets one distinctive name and the repository keeps its layout. pyproject.toml cannot say
"find the packages under this folder and put them under that name", so this file does: every package under
cache/ and train/ is found (a new subpackage needs no entry anywhere), prefixed with ``kd_pipeline.``.
"""

from setuptools import find_packages, setup

NAMESPACE = "kd_pipeline"
SUBPACKAGES = find_packages(include=["cache", "cache.*", "train", "train.*"])

setup(
    package_dir={NAMESPACE: "."},
    packages=[NAMESPACE, *(f"{NAMESPACE}.{name}" for name in SUBPACKAGES)],
)
