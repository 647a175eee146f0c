# cffi_modules has no pyproject.toml spelling: this is its only job.
from setuptools import setup

setup(cffi_modules=["build_virtdisk.py:ffi"])
