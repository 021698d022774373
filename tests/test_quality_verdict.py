"""The report's speech-quality verdict and per-client accounts, from hand-made scores and events."""

from pathlib import Path
from types import SimpleNamespace

from fedvox.shared.runconfig import RunConfig
from fedvox.simulations.quality import summary
from fedvox.simulations.report import RunData, _quality_section, _verdict, client_accounts


def _quality(federated_gain: float) -> dict:
    speakers = [f"spk{k}" for k in range(6)]
    items = {f"{s}#{i}": {"speaker": s, "language": "en", "index": i} for s in speakers for i in range(2)}
    base = {key: 0.60 + 0.01 * n for n, key in enumerate(items)}

    def scores(shift: float) -> dict:
        return {
            key: {"similarity": value + shift, "wer": 0.5, "mcd": 8.0 - shift, "speech": 0.9}
            for key, value in base.items()
        }

    return {
        "items": items,
        "clients": speakers,
        "unseen": [],
        "speakers": {"base": None, "federated": None, "local only": speakers},
        "scores": {
            "recordings": scores(0.3),
            "base": scores(0.0),
            "federated": scores(federated_gain),
            "local only": scores(0.0),
        },
    }


def test_a_measured_gain_is_called_with_its_interval_and_no_gain_is_called_none():
    better = summary.comparisons(_quality(0.07))
    first = better[0]
    assert (first.first, first.second) == ("federated", "local only")
    assert abs(first.differences["similarity"].mean - 0.07) < 1e-9
    sentence = first.sentence("similarity", " at epsilon 8")
    assert (
        sentence.startswith(
            "The federated model is closer to the speakers' voices than local-only training at epsilon 8"
        )
        and "+0.070 ± 0.000" in sentence
    )
    assert "spectrally closer" in first.sentence("mcd")
    assert "not measurably different in intelligibility" in first.sentence("wer")
    same = summary.comparisons(_quality(0.0))[0]
    assert "not measurably different in voice from local-only training" in same.sentence("similarity")
    worse = summary.comparisons(_quality(-0.05))[0]
    assert "further from the speakers' voices than" in worse.sentence("similarity")


def test_levels_are_only_given_for_models_scored_on_every_speaker_of_the_set():
    quality = _quality(0.07)
    quality["speakers"]["local only"] = ["spk0"]
    quality["scores"]["local only"] = {k: v for k, v in quality["scores"]["local only"].items() if k.startswith("spk0")}
    levels = summary.levels(quality, set(quality["clients"]))
    assert set(levels) == {"recordings", "base", "federated"}


def _run(quality: dict | None = None, **fields) -> RunData:
    defaults: dict = {
        "name": "run",
        "folder": Path("."),
        "spec": {},
        "config": RunConfig(),
        "completed": 2,
        "calibration": {"target-epsilon": 8.0},
        "timings": {},
        "spans": {},
        "peak_rss": 0,
        "fleet": {},
        "clients": [],
        "metrics": [],
        "events": [],
        "evaluation": {},
        "utterance_epsilon": {},
        "speaker_epsilon": {},
        "sample": None,
        "quality": quality,
        "host_load": {},
    }
    return RunData(**(defaults | fields))


def test_the_verdict_states_every_measured_difference_not_only_the_headline_comparisons():
    quality = _quality(0.0)
    for value in quality["scores"]["federated"].values():
        value["mcd"] -= 1.0 + 0.01 * value["similarity"]  # spectrally closer than base and local only; same voice
    verdict = _verdict(_run(quality))
    assert "The federated model is not measurably different in voice from the base model on the clients" in verdict
    assert "The federated model is spectrally closer to the recordings than the base model on the clients" in verdict
    assert "local-only training at epsilon 8 on the clients that also trained alone (6 speaker(s)" in verdict
    assert "speech-like" not in verdict  # equal everywhere: not called, and not the headline's metric
    assert verdict.count("intelligibility") == 1  # the headline's WER, called or not; no other
    two = _quality(0.07)
    two["clients"] = two["speakers"]["local only"] = ["spk0", "spk1"]
    two["items"] = {k: v for k, v in two["items"].items() if v["speaker"] in two["clients"]}
    two["scores"] = {m: {k: v for k, v in s.items() if k in two["items"]} for m, s in two["scores"].items()}
    assert "not measurably different in voice" in _verdict(_run(two)) and "too few speakers" in _verdict(_run(two))


def test_epsilon_spent_on_updates_the_server_did_not_use_is_counted_per_client():
    events = [{"round": r, "partition": 0, "client-id": "c0", "outcome": "ok", "class": "cpu"} for r in (1, 2)]
    events += [{"round": r, "partition": 1, "client-id": "c1", "outcome": "straggler", "class": "slow"} for r in (1, 2)]
    metrics = [
        {"round": r, "clients": [{"client-id": "c0", "accepted": True}, {"client-id": "c1", "accepted": False}]}
        for r in (1, 2)
    ]
    run = _run(
        calibration={},
        clients=[{"partition": 0, "class": "cpu"}, {"partition": 1, "class": "slow"}],
        metrics=metrics,
        events=events,
        utterance_epsilon={0: {1: 3.0, 2: 5.0}, 1: {1: 3.0, 2: 5.0}},
    )
    accounts = client_accounts(run)
    assert accounts[0] | {"outcomes": None} == {
        "class": "cpu",
        "trained": 2,
        "accepted": 2,
        "epsilon": 5.0,
        "epsilon-unused": 0.0,
        "speaker-epsilon": None,
        "outcomes": None,
    }
    assert accounts[1]["accepted"] == 0 and accounts[1]["epsilon-unused"] == 5.0
    assert accounts[1]["outcomes"] == {"straggler": 2}


def test_the_speech_quality_section_gives_one_clients_table_when_every_client_also_trained_alone(tmp_path: Path):
    quality = {**_quality(0.07), "total-seconds": 1.0, "seconds": {"base": 1.0}}
    run = SimpleNamespace(name="run", quality=quality)
    text = _quality_section(run, tmp_path)  # type: ignore[arg-type]
    assert "**Clients, each also trained alone** (6):" in text and "**Clients that also trained alone**" not in text
    quality["speakers"]["local only"] = quality["clients"][:3]
    text = _quality_section(run, tmp_path)  # type: ignore[arg-type]
    assert "**Clients** (6):" in text and "**Clients that also trained alone** (3):" in text


def test_the_verdict_says_when_wer_cannot_separate_the_models():
    quality = _quality(0.0)
    assert "WER cannot separate" not in _verdict(_run(quality))  # the recordings' own WER 0.5
    for value in quality["scores"]["recordings"].values():
        value["wer"] = 0.95
    assert "the recogniser misses most words of the recordings themselves (WER 0.95)" in _verdict(_run(quality))
