"""One import root: every package folder installs under ``fedvox`` and nothing generic lands in site-packages."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOPS = ("shared", "client", "server", "simulations")


def _config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_folder_is_listed_under_fedvox() -> None:
    folders = {
        f"fedvox.{p.parent.relative_to(ROOT).as_posix().replace('/', '.')}"
        for top in TOPS
        for p in (ROOT / top).rglob("__init__.py")
    }
    assert folders == set(_config()["packages"])


def test_the_four_folders_map_to_fedvox() -> None:
    assert _config()["package-dir"] == {f"fedvox.{top}": top for top in TOPS}


def test_imports_resolve_to_this_checkout() -> None:
    import fedvox.client
    import fedvox.server
    import fedvox.shared
    import fedvox.simulations

    for module, top in (
        (fedvox.shared, "shared"),
        (fedvox.client, "client"),
        (fedvox.server, "server"),
        (fedvox.simulations, "simulations"),
    ):
        assert Path(module.__file__).resolve().parent == ROOT / top


def test_no_code_imports_the_bare_folder_names() -> None:
    """Tests run from the checkout, where a bare folder-name import would silently load a second copy."""
    import re

    bare = re.compile(r"\b(?:from|import) (?:client|server|shared|simulations)\b(?!\.\w+ as)")
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for folder in (*TOPS, "tests", "bench")
        for path in (ROOT / folder).rglob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if bare.search(line) and "fedvox." not in line
    ]
    assert offenders == []
