"""bench/gpu.sh, the one script for every GPU figure, runs its whole path on a CPU with tiny models."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_script_dry_run_on_cpu_writes_one_report(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--device", "cpu", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu.json").read_text())
    settings = {(s["stage"], s["precision"]) for s in report["dp_step"]}
    assert settings == {("s1", "bf16"), ("s1", "fp32"), ("s2", "bf16")}
    for setting in report["dp_step"]:
        assert setting["plain_ratio_to_plain"] == 1.0
        assert setting["fedvox_ratio_to_plain"] > 0 and setting["secure_ratio_to_plain"] > 0
    assert [row["device"] for row in report["profile_fit"]] == ["x86-avx2"]
    assert [r["params"] for r in report["secure_noise"]["results"]] == [1000, 70000]
    # On a CPU both sides of the check run the same arithmetic: this tests the report's plumbing.
    # The torch (accelerator) arithmetic is checked against numpy's in tests/test_privacy_noise.py.
    assert all(r["same_as_cpu"] for r in report["secure_noise"]["results"])
    assert report["train"]["steps"] == 2 and report["train"]["wall_s"] >= 0
    assert "DP training run s1" in done.stdout
