"""Every command-line tool answers --help and --version without loading the training stack."""

import subprocess
import sys

import pytest

CLIS = {
    "fedvox-server": "fedvox.server.cli",
    "fedvox-client": "fedvox.client.cli",
    "fedvox-sim": "fedvox.simulations.cli",
    "fedvox-audit": "fedvox.client.audit_cli",
}
HEAVY = ("torch", "opacus", "dp_accounting", "flwr", "ray", "scipy.stats")


@pytest.mark.parametrize("module", CLIS.values())
def test_cli_modules_import_no_heavy_library(module: str) -> None:
    probe = f"import sys, {module}; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == [], f"{module} imports {loaded} at start; import them inside the command that needs them"


@pytest.mark.parametrize("module", CLIS.values())
def test_version(module: str) -> None:
    from importlib.metadata import version

    probe = f"import sys, {module} as cli; sys.argv = ['x', '--version']; cli.main()"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"fedvox {version('fedvox')}"
