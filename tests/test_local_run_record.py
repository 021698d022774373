"""A local run's record: settings added later read as what earlier runs trained, so a resume is judged exactly."""

import json

import pytest

from fedvox.client.local.train import RUN_FILE, LocalTrainingSpec, _previous_run
from fedvox.shared.errors import ConfigError


def _earlier_record(out, spec):
    """A run record as written before ``groups`` and ``s2`` existed, with one checkpoint trained."""
    recorded = spec.to_dict()
    del recorded["groups"], recorded["s2"]
    out.mkdir()
    (out / RUN_FILE).write_text(json.dumps({"run_id": "local-0", "spec": recorded}))
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "step-00000002.pt").write_bytes(b"")


def test_an_earlier_s1_run_resumes_with_todays_settings(tmp_path):
    spec = LocalTrainingSpec(stage="s1")
    _earlier_record(tmp_path / "run", spec)
    assert _previous_run(tmp_path / "run", spec)["run_id"] == "local-0"


def test_an_earlier_s2_run_trained_every_target_with_the_gan_and_resumes_only_so(tmp_path):
    spec = LocalTrainingSpec(stage="s2")
    _earlier_record(tmp_path / "run", spec)
    with pytest.raises(ConfigError, match=r"other settings \(adversarial: True in the run, False now; lora: all in"):
        _previous_run(tmp_path / "run", spec)
    earlier = LocalTrainingSpec(stage="s2", s2={"lora": "all", "adversarial": True})
    assert _previous_run(tmp_path / "run", earlier)["run_id"] == "local-0"
