"""Scenario files: [[runs]] on top of [run], command-line values on top of both, one line per problem."""

import pytest

from fedvox.shared.errors import ConfigError
from fedvox.simulations.runner import LEARNING_RATE, SERVER_STEP, run_config
from fedvox.simulations.scenario import build_scenario, read_scenario
from fedvox.simulations.speakers import SpeakersConfig

SWEEP = """name = "sweep"
[speakers]
n = 4
lang = "en"
[run]
rounds = 2
[run.config]
local-steps = 3
[[runs]]
name = "eps-1"
epsilon = 1
[[runs]]
name = "eps-8"
clients-per-round = 2
[runs.config.dp]
delta = 1e-6
"""


def test_runs_read_on_top_of_the_run_table_and_options_on_top_of_the_file(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text(SWEEP)
    scenario = read_scenario(path)
    assert scenario.speakers == SpeakersConfig(n_speakers=4, language="en")
    first, second = scenario.runs
    assert (first.rounds, first.epsilon, first.config) == (2, 1.0, {"local-steps": 3})
    assert second.clients_per_round == 2 and second.config == {"local-steps": 3, "dp.delta": 1e-6}
    given = build_scenario(path, {"n_speakers": 2, "seed": None}, {"rounds": 5, "config": {"local-steps": 1}})
    assert given.speakers.n_speakers == 2 and {run.rounds for run in given.runs} == {5}
    assert given.runs[1].config == {"local-steps": 1, "dp.delta": 1e-6}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("clients-per-round = 2", "clients-per-round = -1"), r"\[\[runs\]\] #2: run clients-per-round must be >= 0"),
        (("rounds = 2", "rounds = 2.5"), r"sweep.toml \[run\]: run rounds must be an integer, got 2.5"),
        (("rounds = 2", "colour = 2"), r"\[run\]: unknown run key 'colour'; known keys: name, rounds"),
        (("n = 4", "n = 0"), r"sweep.toml: scenario speakers.n must be in \[1, 1000\] \(the clients; .*\), got 0"),
        (('name = "eps-8"', 'name = "eps-1"'), r"scenario: runs share a name: \['eps-1', 'eps-1'\]"),
        (('name = "eps-8"', 'name = "a/b"'), r"run name must be letters, digits"),
        (("[run.config]", "[run.colour]"), r"\[run\]: unknown run key 'colour'"),
    ],
)
def test_a_bad_value_names_the_file_the_table_and_the_key(tmp_path, change, message):
    path = tmp_path / "sweep.toml"
    path.write_text(SWEEP.replace(*change))
    with pytest.raises(ConfigError, match=message):
        read_scenario(path)


def test_command_line_values_are_checked_too():
    with pytest.raises(ConfigError, match=r"^run rounds must be >= 1, got 0$"):
        build_scenario(None, {}, {"rounds": 0})
    with pytest.raises(ConfigError, match=r"^speakers: utterances must be >= 3 with zipf"):
        build_scenario(None, {"zipf": 1.0, "utterances": 2}, {})


def test_a_run_takes_the_simulations_own_defaults_unless_its_config_says_otherwise(tmp_path):
    (default,) = build_scenario(None, {}, {}).runs
    config = run_config(default, tmp_path, n_clients=8)
    assert (config.learning_rate, config.server_step) == (LEARNING_RATE, SERVER_STEP) != (1e-3, 1.0)
    (custom,) = build_scenario(None, {}, {"config": {"server-step": 1.0, "learning-rate": 0.001}}).runs
    config = run_config(custom, tmp_path, n_clients=8)
    assert (config.learning_rate, config.server_step) == (0.001, 1.0)
