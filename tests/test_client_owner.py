"""A device owner's command line, as they see it: one-line errors, recordings never overwritten,
the whole run checked against the budget before step 1, one vocabulary of flags, progress in logs.

Every test runs the console script's entry point (``main``) with a command line, as a shell would.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from fedvox.client.cli import app, main
from fedvox.client.stages import datasets
from fedvox.shared.privacy.accounting import Mechanism, epsilon
from fedvox.shared.privacy.ledger import Ledger, ledger_file
from tests.data_fixtures import write_good_set
from tests.prepared import prepared_cache

TRANSCRIPT = "Hello world, this is a test."  # the first line of write_good_set's list
UNWRITABLE = Path("/sys/fedvox-owner-test")  # mkdir fails here even for root
TRAIN = [
    "train",
    "--stage",
    "s1",
    "--steps",
    "4",
    "--checkpoint-every",
    "2",
    "--noise-multiplier",
    "1.0",
    "--logical-batch",
    "4",
    "--seed",
    "3",
    "--device",
    "cpu",
    "--physical-batch",
    "4",
]


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Exit status and everything printed (stdout, then stderr) of ``fedvox-client ARGS``."""
    monkeypatch.setattr(sys, "argv", ["fedvox-client", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def recordings(tmp_path_factory) -> Path:
    return write_good_set(tmp_path_factory.mktemp("owner") / "wavs")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return prepared_cache(tmp_path_factory.mktemp("owner-data"))


def fresh(data: Path, folder: Path) -> Path:
    """A copy of the prepared data with no ledger or identity (a new owner's folder)."""
    return Path(shutil.copytree(data, folder, ignore=shutil.ignore_patterns("privacy_ledger.sqlite*", "identity.json")))


# ---------------------------------------------------------------- 1. no tracebacks, nothing private


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs a folder nobody can write (Linux /sys)")
def test_an_unwritable_folder_is_one_line_without_a_traceback_or_a_transcript(recordings, data, monkeypatch, capsys):
    code, output = cli(monkeypatch, capsys, "prepare", str(recordings), "--out", str(UNWRITABLE / "cache"))
    assert code == 2 and len(error_lines(output)) == 1, output
    assert "cannot write to --out" in output and "choose a folder you can write to" in output
    assert "Traceback" not in output and TRANSCRIPT not in output and "spkA" not in output

    code, output = cli(monkeypatch, capsys, *TRAIN, "--data", str(data), "--out", str(UNWRITABLE / "run"))
    assert code == 2 and len(error_lines(output)) == 1 and "Traceback" not in output, output


def test_a_bug_is_one_line_without_its_message_unless_debug(recordings, tmp_path, monkeypatch, capsys):
    import fedvox.client.data.prepare as prepare_module

    def broken(*args, **kwargs):
        raise ValueError(f"cannot handle {TRANSCRIPT!r}")

    monkeypatch.setattr(prepare_module, "prepare", broken)
    code, output = cli(monkeypatch, capsys, "prepare", str(recordings), "--out", str(tmp_path / "c"))
    assert code == 1 and "internal error (ValueError)" in output and "--debug" in output
    assert TRANSCRIPT not in output and "Traceback" not in output
    with pytest.raises(ValueError):  # --debug: the exception (and so its traceback) comes through
        cli(monkeypatch, capsys, "prepare", str(recordings), "--out", str(tmp_path / "c"), "--debug")


def test_no_command_group_prints_rich_tracebacks_with_local_variables():
    from fedvox.client.audit_cli import app as audit_app
    from fedvox.server.cli import app as server_app
    from fedvox.simulations.cli import app as sim_app

    for group in (app, server_app, sim_app, audit_app):
        assert group.pretty_exceptions_enable is False and group.pretty_exceptions_show_locals is False


# ---------------------------------------------------------------- 2. recordings never overwritten


def test_synthesize_never_writes_over_a_recording_or_an_existing_file(recordings, tmp_path, monkeypatch, capsys):
    wavs = sorted(recordings.parent.glob("*.wav"))
    before = {path: path.read_bytes() for path in wavs}
    base = ["synthesize", "--model", str(tmp_path), "--text", "Hi.", "--ref", str(wavs[0])]
    for extra in ([], ["--force"]):
        code, output = cli(monkeypatch, capsys, *base, "--out", str(wavs[1]), *extra)
        assert code == 2 and "is a recording listed in" in output and "never overwrites recordings" in output
    other = tmp_path / "mine.wav"
    other.write_bytes(b"not fedvox's")
    code, output = cli(monkeypatch, capsys, *base, "--out", str(other))
    assert code == 2 and "exists" in output and "--force" in output
    assert {path: path.read_bytes() for path in wavs} == before and other.read_bytes() == b"not fedvox's"


def test_prepare_writes_only_into_a_new_empty_or_earlier_prepare_folder(recordings, tmp_path, monkeypatch, capsys):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "report.txt").write_text("my own notes")
    code, output = cli(monkeypatch, capsys, "prepare", str(recordings), "--out", str(theirs))
    assert code == 2 and "holds other files" in output
    assert (theirs / "report.txt").read_text() == "my own notes"
    code, output = cli(monkeypatch, capsys, "prepare", str(recordings), "--out", str(recordings.parent))
    assert code == 2 and "--out" in output


def test_export_writes_only_into_a_new_empty_or_earlier_export_folder(tmp_path, monkeypatch, capsys):
    from fedvox.server.cli import main as server_main

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "s1.ckpt").write_bytes(b"my own model")
    (tmp_path / "run").mkdir()
    monkeypatch.setattr(sys, "argv", ["fedvox-server", "export", str(tmp_path / "run"), "--out", str(theirs)])
    with pytest.raises(SystemExit) as exit_info:
        server_main()
    assert exit_info.value.code == 2 and "holds other files" in capsys.readouterr().err
    assert (theirs / "s1.ckpt").read_bytes() == b"my own model"


# ---------------------------------------------------------------- 3, 4, 10. the whole run, up front


def test_the_whole_run_is_checked_before_step_one_and_continues_after_the_budget_is_raised(
    data, tmp_path, monkeypatch, capsys
):
    folder, out = fresh(data, tmp_path / "data"), tmp_path / "run"
    train_size = len(datasets("s1", folder, 0.1)[0])
    half, whole = (epsilon([Mechanism(1.0, 4 / train_size, steps)], 1e-5) for steps in (2, 4))
    budget = f"{(half + whole) / 2:.6f}"  # the first segment fits, the whole run does not

    run = [*TRAIN, "--data", str(folder), "--out", str(out)]
    code, output = cli(monkeypatch, capsys, *run, "--budget-epsilon", budget)
    assert code == 2 and "past the budget" in output and "nothing was trained or charged" in output, output
    assert "raise --budget-epsilon" in output
    assert not out.exists() and not ledger_file(folder).exists()  # a refusal leaves nothing behind

    code, output = cli(monkeypatch, capsys, *run, "--budget-epsilon", "50")
    assert code == 0, output
    assert "model config tiny (the default" in output
    assert f"logs: {out / 'logs'}" in output and "checked now, before training" in output, output
    assert "DP training: 4/4" in output, output  # not a terminal: progress lines, not a bar
    validation = [line for line in output.splitlines() if "validation" in line]
    assert validation and all(len(number.split(".")[-1]) <= 4 for number in _numbers(validation[-1]))
    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epsilon"] for r in records if r["kind"] == "privacy"] == [r.epsilon for r in Ledger(folder).rows()]
    assert any(path.name.startswith("events.out.tfevents") for path in (out / "logs" / "tensorboard").iterdir())

    # 4. a finished run is reported as it is; summary.json stays as the run wrote it
    summary = (out / "summary.json").read_bytes()
    code, output = cli(monkeypatch, capsys, *run, "--budget-epsilon", "50")
    assert code == 0 and "finished earlier" in output and "trained 4 steps" in output, output
    assert (out / "summary.json").read_bytes() == summary and len(Ledger(folder).rows()) == 2

    # other settings on a trained run: say which
    code, output = cli(monkeypatch, capsys, *TRAIN, "--learning-rate", "0.01", "--data", str(folder), "--out", str(out))
    assert code == 2 and "learning_rate: 0.001 in the run, 0.01 now" in output


def _numbers(line: str) -> list[str]:
    return [token.strip(",;") for token in line.split() if token.strip(",;").replace(".", "", 1).isdigit()]


# ---------------------------------------------------------------- 5. duplicates among accepted entries


def test_a_rejected_line_does_not_make_a_valid_line_of_the_same_recording_a_duplicate(
    recordings, tmp_path, monkeypatch, capsys
):
    listed = tmp_path / "wavs"
    shutil.copytree(recordings.parent, listed)
    first = (listed / "good.list").read_text().splitlines()[0]
    audio, speaker, language, _ = first.split("|")
    (listed / "dup.list").write_text(f"{audio}|{speaker}|{language}|\n{first}\n{first}\n", encoding="utf-8")
    code, output = cli(
        monkeypatch,
        capsys,
        "prepare",
        str(listed / "dup.list"),
        "--out",
        str(tmp_path / "c"),
        "--model-config",
        "tiny",
        "--json",
    )
    report, _ = json.JSONDecoder().raw_decode(output[output.index("{") :])
    assert code == 0 and report["accepted"] == 1
    assert {r["line"]: r["reason"] for r in report["rejected"]} == {1: "empty_text", 3: "duplicate_entry"}
    assert "same file as line 2" in next(r["message"] for r in report["rejected"] if r["line"] == 3)


# ---------------------------------------------------------------- 6. runs that cannot learn


def test_a_run_that_cannot_learn_is_named_and_refused_with_strict(data, tmp_path, monkeypatch, capsys):
    folder = fresh(data, tmp_path / "data")
    noisy = [*TRAIN, "--data", str(folder), "--out", str(tmp_path / "r"), "--strict", "--budget-epsilon", "50"]
    noisy[noisy.index("--noise-multiplier") + 1] = "500"
    code, output = cli(monkeypatch, capsys, *noisy)
    assert code == 2 and "this run cannot learn" in output and "--strict" in output
    assert "noise multiplier 500 / expected batch 4" in output and not (tmp_path / "r").exists()

    whole = [*TRAIN, "--data", str(folder), "--out", str(tmp_path / "r"), "--strict", "--budget-epsilon", "50"]
    whole[whole.index("--logical-batch") + 1] = "1000000"
    code, output = cli(monkeypatch, capsys, *whole)
    assert code == 2 and "covers all" in output and "no privacy amplification" in output


# ---------------------------------------------------------------- 8. unclear errors, each one line


def test_each_common_mistake_is_one_line_with_its_fix(recordings, data, tmp_path, monkeypatch, capsys):
    code, output = cli(monkeypatch, capsys, *TRAIN, "--data", str(recordings), "--out", str(tmp_path / "a"))
    assert code == 2 and "is a file, not a prepared data folder" in output

    base = ["synthesize", "--model", str(tmp_path), "--text", "Hi.", "--out", str(tmp_path / "x.wav")]
    code, output = cli(monkeypatch, capsys, *base, "--ref", str(tmp_path / "absent.wav"))
    assert code == 2 and "reference recording" in output and "does not exist" in output

    zero = [*TRAIN[:7], "--epsilon", "0", "--data", str(data), "--out", str(tmp_path / "b")]
    code, output = cli(monkeypatch, capsys, *zero)
    assert code == 2 and "--epsilon must be > 0" in output and "target_epsilon" not in output

    code, output = cli(monkeypatch, capsys, "status", "--data", str(tmp_path / "typo"))
    assert code == 2 and "check --data" in output

    utf16 = tmp_path / "utf16.list"
    utf16.write_text(f"{recordings.parent / 'spkA_0000.wav'}|spkA|en|{TRANSCRIPT}\n", encoding="utf-16")
    code, output = cli(monkeypatch, capsys, "prepare", str(utf16), "--out", str(tmp_path / "c"))
    assert code == 2 and "is UTF-16 text" in output and "save it as UTF-8" in output

    import fedvox.client.local as local

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(local, "train_local", interrupted)
    code, output = cli(monkeypatch, capsys, *TRAIN, "--data", str(data), "--out", str(tmp_path / "k"))
    assert code == 130 and "run the same command again to resume" in output


def test_status_reads_a_ledger_in_a_folder_it_cannot_write(data, tmp_path, monkeypatch, capsys):
    import os

    folder = fresh(data, tmp_path / "data")
    from fedvox.shared.privacy.accounting import Mechanism as M
    from fedvox.shared.privacy.ledger import Release

    with Ledger(folder) as ledger:
        ledger.append(
            Release(
                run_id="r",
                round=1,
                client_id="c",
                stage="s1",
                unit="utterance",
                mechanism=M(1.0, 0.5, 3),
                delta=1e-5,
                clip_norm=1.0,
            )
        )
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if mode == os.W_OK else real_access(path, mode))
    code, output = cli(monkeypatch, capsys, "status", "--data", str(folder))
    assert code == 0 and "1 releases, 3 steps" in output, output


# ---------------------------------------------------------------- 9. one vocabulary


def test_one_vocabulary_old_names_work_hidden_and_help_reads_whole(monkeypatch, capsys):
    _, output = cli(monkeypatch, capsys, "train", "--help")
    for name in (
        "--model-config",
        "--learning-rate",
        "--clip-norm",
        "--budget-epsilon",
        "--pretrained",
        "--logical-batch",
        "--threads",
        "--strict",
    ):
        assert name in output, name
    for old in ("--lr ", "--clip ", "--budget ", "--init ", "--batch "):
        assert old not in output, old
    from fedvox.client.cli import RENAMED
    from fedvox.shared.cli import rename_options

    args = rename_options(["train", "--lr", "0.1", "--budget=3", "--data", "x"], RENAMED)
    assert args == ["train", "--learning-rate", "0.1", "--budget-epsilon=3", "--data", "x"]
    assert "--lr is now --learning-rate" in capsys.readouterr().err

    _, output = cli(monkeypatch, capsys, "enroll", "--help")
    assert "[profile]" in output and "whose  table" not in " ".join(output.split("│"))
    # the command list shows each docstring's first paragraph: a line break there cuts a sentence
    for group in (app,):
        for command in group.registered_commands:
            first = command.callback.__doc__.strip().split("\n\n")[0]
            assert "\n" not in first and first.endswith("."), first


# ---------------------------------------------------------------- 10. the owner's budget, in one command


def test_budget_shows_and_sets_the_owners_budget_and_spending_per_kind_of_run(data, tmp_path, monkeypatch, capsys):
    import os

    from fedvox.client.identity import client_identity
    from fedvox.shared.privacy.ledger import Release

    folder = fresh(data, tmp_path / "data")
    code, output = cli(monkeypatch, capsys, "budget", "--data", str(folder))
    assert code == 0 and "budget: none recorded yet" in output and "spent together: epsilon 0.000" in output, output

    code, output = cli(monkeypatch, capsys, "budget", "--data", str(folder), "--epsilon", "6", "--delta", "1e-6")
    assert code == 0 and "budget: epsilon 6 at delta 1e-06" in output, output

    client = client_identity(folder)
    federated, local = Mechanism(2.0, 0.05, 10), Mechanism(1.0, 0.4, 3)
    with Ledger(folder) as ledger:
        for run_id, mechanism in (("run/r-0123456789abcdef", federated), ("local-0123456789ab", local)):
            release = Release(run_id, 1, client, "s1", "utterance", mechanism, 1e-6, 1.0)
            total = ledger.append(release).epsilon
    code, output = cli(monkeypatch, capsys, "budget", "--data", str(folder))
    assert code == 0, output
    assert f"spent in federations: epsilon {epsilon([federated], 1e-6):.3f} (1 releases, 1 runs)" in output
    assert f"spent in local training: epsilon {epsilon([local], 1e-6):.3f} (1 releases, 1 runs)" in output
    assert f"spent together: epsilon {total:.3f}" in output and f"remaining: epsilon {6 - total:.3f} of 6" in output

    # Raise and lower: the owner's; the delta of released rows: refused, one line naming --delta.
    for value in ("8", "0.5"):
        code, output = cli(monkeypatch, capsys, "budget", "--data", str(folder), "--epsilon", value)
        assert code == 0 and f"budget: epsilon {value} at delta 1e-06" in output, output
    assert "remaining: epsilon 0.000 of 0.5" in output
    for args, says in ((("--delta", "1e-5"), "--delta"), (("--epsilon", "0"), "epsilon > 0")):
        code, output = cli(monkeypatch, capsys, "budget", "--data", str(folder), *args)
        assert code != 0 and len(error_lines(output)) == 1 and says in error_lines(output)[0], output
        assert "Traceback" not in output
    # An enrolled SuperNode would record its own budget again: changing it here is refused, naming enroll.
    device = Path(os.environ["FEDVOX_HOME"]) / "device"
    device.mkdir(parents=True)
    (device / "node-config.toml").write_text(f"data-path = {json.dumps(str(folder))}\nbudget-epsilon = 0.5\n")
    code, output = cli(monkeypatch, capsys, "budget", "--data", str(folder), "--epsilon", "9")
    assert code != 0 and len(error_lines(output)) == 1 and "fedvox-client enroll" in output, output
    with Ledger(folder) as ledger:
        assert ledger.owner_budget(client).epsilon == 0.5
