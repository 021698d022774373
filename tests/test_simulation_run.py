"""``fedvox-sim run`` end to end: 3 speakers, 2 rounds, Flower's simulation engine on Ray.

One real simulation (CLI -> speakers -> features -> Ray federation -> scoring -> baselines ->
sample -> report); everything is checked on it. A fleet whose third client always drops out
shows that a dropped client does not stall a round. About 1.5 min on 2 busy cores.
"""

import json
import os

import pytest
from typer.testing import CliRunner

from fedvox.shared.privacy.ledger import Ledger
from fedvox.simulations.cli import app

pytestmark = pytest.mark.slow  # starts Ray worker processes and a process pool

FLEET = """
deadline-factor = 0.0
[devices.steady]
reference = "x86-avx2"
share = 2
[devices.flaky]
reference = "raspberry-pi5"
share = 1
dropout = 1.0
"""


def _run(root):
    """``fedvox-sim run`` on the test's fleet into ``root / "out"`` (the same command each time)."""
    fleet = root / "flaky.toml"
    fleet.write_text(FLEET)
    out = root / "out"
    result = CliRunner().invoke(
        app,
        [
            "run",
            "--speakers",
            "3",
            "--utterances",
            "6",
            "--rounds",
            "2",
            "--fleet",
            str(fleet),
            "--epsilon",
            "8",
            "--local-baselines",
            "1",
            "--out",
            str(out),
            "--run-config",
            "local-steps=2 logical-batch=2 learning-rate=0.01 model-config='tiny' pretrained=''",
        ],
        catch_exceptions=False,
    )
    return out, result


@pytest.fixture(scope="module")
def simulation(tmp_path_factory):
    out, result = _run(tmp_path_factory.mktemp("sim"))
    assert result.exit_code == 0, result.output
    folder = out / "runs" / "run"
    flaky = next(
        c["partition"] for c in json.loads((folder / "fleet.json").read_text())["clients"] if c["class"] == "flaky"
    )
    return out, folder, flaky


def test_the_report_its_plots_and_the_sample_are_written(simulation):
    out, folder, _ = simulation
    report = (out / "report.md").read_text()
    for png in ("plots/run-loss.png", "plots/run-epsilon.png", "plots/run-system.png", "runs/run/sample/sample.png"):
        assert f"]({png})" in report
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (folder / "sample" / "sample.wav").stat().st_size > 1000
    assert "fresh, untrained s2 model" in report
    summary = json.loads((out / "summary.json").read_text())["run"]
    assert summary["rounds"] == 2 and summary["simulated-time-s"] > 0


def test_the_baselines_and_the_scoring_run_beside_the_federation_and_the_report_splits_the_wall_clock(simulation):
    out, folder, _ = simulation
    run = json.loads((folder / "run.json").read_text())
    spans, timings = run["spans-s"], run["timings-s"]
    assert {"federation", "baselines", "speech-quality", "evaluation", "sample"} <= set(spans)
    assert spans["baselines"][0] < spans["federation"][1]  # started while the federation ran
    assert spans["speech-quality"][1] <= timings["wall"] and spans["sample"][1] <= timings["wall"]
    assert timings["after-federation"] == pytest.approx(timings["wall"] - spans["federation"][1])
    quality = json.loads((folder / "quality.json").read_text())
    assert list(quality["scores"]) == ["recordings", "base", "federated", "local only", "central"]
    assert quality["speakers"]["local only"] == [
        json.loads((folder / "evaluation.json").read_text())["local"][0]["speaker"]
    ]
    assert f"the run took **{timings['wall']:.0f} s** of wall clock" in (out / "report.md").read_text()


def test_every_round_is_scored_on_seen_and_unseen_speakers_with_both_baselines(simulation):
    _, folder, _ = simulation
    evaluation = json.loads((folder / "evaluation.json").read_text())
    assert sorted(evaluation["global"]) == ["0", "1", "2"]
    for scores in evaluation["global"].values():
        assert sorted(scores["seen"]) == ["spk000", "spk001", "spk002"]
        assert sorted(scores["unseen"]) == ["unseen000", "unseen001"]
    (local,) = evaluation["local"]
    assert sorted(local["losses"]) == ["1", "2"] and list(local["losses"]["2"]["seen"]) == [local["speaker"]]
    assert len(local["epsilon"]) == 2
    assert sorted(evaluation["central"]["losses"]) == ["1", "2"]


def test_a_client_that_always_drops_out_does_not_stall_a_round(simulation):
    _, folder, flaky = simulation
    metrics = [json.loads(line) for line in (folder / "server" / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["aggregated"] and m["participants"] == 2 and m["rejects"] == {"error": 1}
    events = [json.loads(line) for line in (folder / "events" / f"client-{flaky}.jsonl").read_text().splitlines()]
    assert [e["outcome"] for e in events] == ["dropout", "dropout"]
    assert all(e["niceness"] == os.nice(0) for e in events)  # Ray's workers at this process's priority


def test_ledgers_hold_one_release_per_trained_round_and_baselines_charge_their_own(simulation):
    _, folder, flaky = simulation
    for p in range(3):
        with Ledger(folder / "clients" / f"client-{p}") as ledger:
            rows = ledger.rows(unit="utterance")
        assert [r.round for r in rows] == ([] if p == flaky else [1, 2])
        assert all(r.epsilon <= 8.0 + 1e-6 for r in rows)
    local = json.loads((folder / "evaluation.json").read_text())["local"][0]
    with Ledger(folder / "baselines" / "local" / f"client-{local['partition']}" / "data") as ledger:
        assert len(ledger.rows(unit="utterance")) == 2  # one per round's worth of local steps
    assert (folder / "server" / "checkpoints" / "round-00002.json").is_file()


def test_the_report_can_be_rebuilt_from_the_folder(simulation):
    out, _, _ = simulation
    (out / "report.md").unlink()
    result = CliRunner().invoke(app, ["report", str(out)], catch_exceptions=False)
    assert result.exit_code == 0 and (out / "report.md").is_file()


def test_the_same_command_again_reuses_the_baselines_and_their_scores(simulation):
    out, folder, _ = simulation
    before = json.loads((folder / "evaluation.json").read_text())
    scores = json.loads((folder / "quality.json").read_text())["scores"]
    _, result = _run(out.parent)
    assert result.exit_code == 0, result.output
    after = json.loads((folder / "evaluation.json").read_text())
    (local,) = after["local"]
    assert local["reused"] and after["central"]["reused"]
    assert local["losses"] == before["local"][0]["losses"] and after["central"]["losses"] == before["central"]["losses"]
    quality = json.loads((folder / "quality.json").read_text())
    assert quality["reused"] == ["base", "central", "local only"]
    assert all(quality["scores"][name] == scores[name] for name in quality["reused"])
    with Ledger(folder / "baselines" / "local" / f"client-{local['partition']}" / "data") as ledger:
        assert len(ledger.rows(unit="utterance")) == 2  # the baseline's own ledger came with it
    assert "**Reused** from an earlier run" in (out / "report.md").read_text()
