"""A real federation on 127.0.0.1: ``fedvox-server start`` and ``fedvox-client enroll`` processes
over TLS with device authentication, Flower's SuperLink and SuperNodes underneath.

Every ClientApp message is a new process (forked from the device's warm ClientApp host once it
is ready, else one that imports torch: about 7 s alone, more on a busy machine), so the
federation is as small as the claims allow: tiny s1, two rounds, no evaluation (one query and
two trainings per device).
"""

import json
import shutil
import subprocess
import time

import numpy as np
import psutil
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.proto.fleet_pb2 import PushMessagesRequest  # pylint: disable=E0611
from flwr.proto.message_pb2 import PullObjectRequest, PullObjectResponse, PushObjectRequest  # pylint: disable=E0611
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from typer.testing import CliRunner

from fedvox.client.data.cache import FeatureCache
from fedvox.client.enroll import DeviceHome, device_key
from fedvox.client.identity import client_identity
from fedvox.client.message_times import read_times
from fedvox.server.checkpoints import RoundCheckpoints
from fedvox.server.cli import app as server_cli
from fedvox.server.model import initial_subset
from fedvox.shared.device_keys import fingerprint, parse_public_key
from fedvox.shared.privacy.audit import audit_ledger
from fedvox.shared.privacy.ledger import Ledger
from fedvox.shared.privacy.ledger_head import LEDGER_HEAD, SignedHead, recorded_heads
from fedvox.shared.processes import flower_command, flower_env, free_port
from fedvox.shared.protocol import ClientStatus
from fedvox.shared.wire import PACKED, read_update
from tests.data_fixtures import GOOD
from tests.deploy_kit import (
    BIN,
    ENV,
    enroll,
    kill_tree,
    register,
    server_home,
    spawn,
    start_server,
    start_tap,
    stop,
    sweep,
    throw_garbage,
    wait_for,
)
from tests.prepared import prepared_cache

pytestmark = pytest.mark.slow

TRAIN_METRICS = {"bytes-down", "bytes-up"}  # a device releases no loss, count, memory or time


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepared_cache(tmp_path_factory.mktemp("prepared"))


@pytest.fixture
def processes():
    """The processes a test starts: stopped however the test ends; anything they left behind fails it."""
    started: list[subprocess.Popen] = []
    yield started
    stop(*started)
    left = sweep()
    assert not left, f"processes outlived the commands that started them: {left}"


def _data(prepared, folder):
    shutil.copytree(prepared, folder)
    return folder


def test_two_enrolled_devices_train_two_rounds_and_only_the_update_leaves_them(prepared, tmp_path, processes, request):
    home = server_home(tmp_path / "server")
    server = start_server(home)
    processes.append(server)
    tap, tap_server, address = start_tap(home)  # devices connect through the recording tap
    request.addfinalizer(tap_server.stop)
    devices = {}
    for name in ("alice", "bob"):
        data = _data(prepared, tmp_path / f"{name}-data")
        devices[name] = (enroll(address, home, data, tmp_path / name), data, DeviceHome.at(tmp_path / name))
        processes.append(devices[name][0])
    for name, (process, _, device_home) in devices.items():
        wait_for(tmp_path / f"{name}.out", r"waiting for the registration", process)
        assert "fedvox-server register SERVER_HOME 'ecdsa-sha2-nistp384 " in (tmp_path / f"{name}.out").read_text()
        register(home, device_home.public_key, name)

    # Garbage on the public port while the federation runs: each attempt costs one connection.
    garbage = throw_garbage(f"127.0.0.1:{home.settings().port}", home, tmp_path)
    assert any(o.startswith("expired client certificate: fleet 4") and o.endswith("control 404") for o in garbage), (
        garbage
    )
    assert "wrong CA: ConnectError" in garbage, garbage

    # A third device whose key nobody registered: Flower's own SuperNode is refused at once ...
    stranger_home = DeviceHome.at(tmp_path / "stranger")
    stranger_key, _ = device_key(stranger_home)
    stranger_env = flower_env(stranger_home.flwr_home)
    stranger = spawn(
        [
            flower_command("flower-supernode", stranger_env),
            "--superlink",
            address,
            "--root-certificates",
            str(home.ca_cert),
            "--auth-supernode-private-key",
            str(stranger_home.key),
            "--port",
            str(free_port()),
            "--node-config",
            f"data-path='{devices['alice'][1]}'",
        ],
        tmp_path / "stranger.out",
        env=stranger_env,
    )
    processes.append(stranger)
    assert stranger.wait(timeout=180) != 0
    assert "Failed to activate SuperNode" in (tmp_path / "stranger.out").read_text()
    # ... and fedvox's check says why, in one line.
    check = subprocess.run(
        [
            str(BIN / "fedvox-client"),
            "enroll",
            "--server",
            address,
            "--root-cert",
            str(home.ca_cert),
            "--data",
            str(devices["alice"][1]),
            "--home",
            str(tmp_path / "stranger"),
            "--check",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=180,
    )
    assert check.returncode == 2 and "does not know this device's key: the operator must register it" in check.stderr

    assert server.wait(timeout=900) == 0, (home.root.parent / "server.out").read_text()[-4000:]
    stop(*processes)  # the devices leave; the server has ended

    # Two rounds, both devices in each, as the operator's commands report them.
    rounds = [json.loads(line) for line in (home.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2] and all(r["participants"] == 2 for r in rounds)
    log = (home.logs / "server.log").read_text()
    assert "device alice" in log and "device bob" in log and "completed: 2 rounds" in log
    assert "refused POST /v1/control/list-runs" in log  # the garbage was seen, and the run went on
    listing = json.loads(_cli("devices", str(home.root), "--json"))
    report = listing["devices"]
    assert [w["fingerprint"] for w in listing["waiting"]] == [fingerprint(stranger_key.public_key())]
    assert {d["name"]: d["rounds-joined"] for d in report} == {"alice": 2, "bob": 2}
    assert all(d["epsilon-spent"] > 0 and d["profile"] and d["status"] == "server stopped" for d in report)
    status = json.loads(_cli("status", str(home.root), "--json"))
    assert status["latest"]["round"] == 2 and status["server"]["running"] is False
    exported = _cli("export", str(home.root), "--format", "safetensors")
    assert (home.run_dir / "export" / "fedvox" / "s1.safetensors").is_file(), exported

    # Each device's own ledger charged both rounds to its data folder's identity.
    # ... and signed its head, with its enrolled key, in every reply; the server kept the heads and
    # the ledger still holds every row they sign for.
    heads = recorded_heads([home.run_dir])
    for _, data, device_home in devices.values():
        with Ledger(data) as ledger:
            rows = ledger.rows(client_id=client_identity(data), unit="utterance")
        assert [r.round for r in rows] == [1, 2]
        enrolled = fingerprint(parse_public_key(str(device_home.public_key)))  # (both copy one recording set,
        mine = [h for h in heads if h.fingerprint == enrolled]  # so they share a client id; the keys differ)
        assert len(mine) == 2 and {h.client_id for h in mine} == {client_identity(data)}
        assert audit_ledger(data, heads=mine).all_findings == []
        # Its messages' times stayed on it; the last training ran in a child of its warm ClientApp host,
        # which got the launcher's environment (the launch time) with its streams.
        trains = [t for t in read_times(device_home.logs) if t["kind"] == "train"]
        assert [t["round"] for t in trains] == [1, 2] and all(t["training_s"] > 0 for t in trains)
        assert 0 < trains[-1]["launched"] <= trains[-1]["forked"] <= trains[-1]["started"] <= trains[-1]["ended"]

    # The stranger never got past activation: no run, no FAB, no message, no model.
    stranger_pk = public_key_to_bytes(stranger_key.public_key())
    stranger_calls = [e for e in tap.exchanges if _public_key(e) == stranger_pk]
    assert stranger_calls and {e.path for e in stranger_calls} == {"/v1/fleet/activate-node"}
    assert all(e.status >= 400 for e in stranger_calls)

    # What crossed the network from the devices: only the trainable subset, metrics, status and signed head.
    _assert_replies_carry_only_updates_and_metrics(tap.exchanges, home, [d for _, d, _ in devices.values()])


def _cli(*args):
    result = CliRunner().invoke(server_cli, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def _public_key(exchange):
    import base64

    value = exchange.headers.get("flwr-public-key")
    return base64.b64decode(value) if value else None


def _assert_replies_carry_only_updates_and_metrics(exchanges, home, data_folders):
    contents, roots = {}, []
    for e in exchanges:
        if e.path == "/v1/fleet/push-object":
            pushed = PushObjectRequest.FromString(e.body)
            contents[pushed.object_id] = pushed.object_content
        elif e.path == "/v1/fleet/pull-object" and e.status == 200:
            pulled = PullObjectResponse.FromString(e.reply)
            if pulled.object_found and pulled.object_available:
                contents[PullObjectRequest.FromString(e.body).object_id] = pulled.object_content
        elif e.path == "/v1/fleet/push-messages":
            roots += [tree.object_id for tree in PushMessagesRequest.FromString(e.body).message_object_trees]
    config = home.run_config()
    subset = {name: tuple(t.shape) for name, t in initial_subset(config).items()}
    replies = [inflate_object_from_contents(root, dict(contents), keep_object_contents=True) for root in roots]
    assert len(replies) == 2 * 3  # per device: one query, two trainings
    trained = 0
    for reply in replies:
        assert isinstance(reply, Message)
        records = reply.content
        assert set(records.config_records) == {"status", LEDGER_HEAD}
        status = ClientStatus.from_record(records.config_records["status"])
        head = SignedHead.from_json(records.config_records[LEDGER_HEAD])
        head.verify()
        assert head.client_id == status.client_id
        assert status.ok and status.client_id.startswith("client-") and status.detail == ""
        assert set(records.config_records["status"]) == {f.replace("_", "-") for f in ClientStatus.__dataclass_fields__}
        if records.array_records:
            trained += 1
            assert set(records.array_records) == {"arrays"} and set(records.metric_records) == {"metrics"}
            arrays: ArrayRecord = records.array_records["arrays"]
            (array,) = arrays.values()  # one packed array: the manifest tiles its bytes exactly
            assert array.stype == PACKED and array.dtype == config.update_encoding  # int4 deltas by default
            update = read_update(arrays)
            assert {k: tuple(update[k].shape) for k in update} == subset
            metrics: MetricRecord = records.metric_records["metrics"]
            assert set(metrics) == TRAIN_METRICS
        else:
            assert not records.metric_records
        assert all(isinstance(r, (ConfigRecord, ArrayRecord, MetricRecord)) for r in records.values())
    assert trained == 4

    # Nothing of the recordings either, byte for byte, in any request a device sent.
    sent = b"".join(e.body for e in exchanges)
    forbidden = [str(f).encode() for f in data_folders] + [b"index.json", b"items/", b".wav", b".flac"]
    forbidden += [text.encode() for _, _, _, text, *_ in GOOD]
    for folder in data_folders:
        cache = FeatureCache(folder)
        for item in cache.read_index().items[:3]:
            tensors = cache.load_item(item.id)
            wave = tensors["wave"].numpy().astype(np.int16).tobytes()
            forbidden += [wave[i : i + 64] for i in range(0, len(wave) - 64, len(wave) // 8)]
            forbidden.append(tensors["phoneme_ids"].numpy().tobytes())
    leaked = [f[:40] for f in forbidden if f and f in sent]
    assert not leaked, leaked


def test_a_killed_device_rejoins_and_a_killed_server_resumes_without_counting_anything_twice(
    prepared, tmp_path, processes
):
    # 100 local steps, not 2: a ClientApp must still be training when the test sees it open the
    # ledger and kills it (2 steps of the tiny s1 took about 1 s, which the kill could miss); more
    # noise keeps the two rounds' epsilon (33 measured) inside the devices' budget of 100
    home = server_home(tmp_path / "server", **{"local-steps": 100, "dp.noise-multiplier": 1.5})
    address = f"127.0.0.1:{home.settings().port}"
    for name in ("alice", "bob"):  # registered before the server starts: authorised when it does
        device_home = DeviceHome.at(tmp_path / name)
        device_key(device_home)
        register(home, device_home.public_key, name)
    server = start_server(home)
    processes.append(server)
    devices = {}
    for name in ("alice", "bob"):
        data = _data(prepared, tmp_path / f"{name}-data")
        devices[name] = (enroll(address, home, data, tmp_path / name), data)
        processes.append(devices[name][0])
    alice, bob = devices["alice"], devices["bob"]

    # Round 1: alice's SuperNode dies (power cut) while its ClientApp trains; the ClientApp goes with it.
    clientapp = _training_clientapp(tmp_path / "alice.out", *alice, nth=1)
    kill_tree(_supernode_of(alice[0]))
    psutil.wait_procs([clientapp], timeout=15)
    assert not clientapp.is_running()
    wait_for(tmp_path / "alice.out", r"closed the session a previous SuperNode of this device left open", alice[0])
    wait_for(home.logs / "server.log", r"round 1 committed", server)

    # Round 2: the whole server dies (SuperLink, ServerApp, everything) while the devices train.
    _training_clientapp(tmp_path / "bob.out", *bob, nth=2)
    kill_tree(server)
    assert [json.loads(line)["round"] for line in (home.run_dir / "metrics.jsonl").read_text().splitlines()] == [1]
    resumed = start_server(home, "--resume")
    processes.append(resumed)
    assert resumed.wait(timeout=900) == 0, (home.root.parent / "server.out").read_text()[-4000:]
    stop(*processes)

    rounds = [json.loads(line) for line in (home.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]  # round 2 was redone after the restart, and logged once
    assert rounds[0]["participants"] == 1 and rounds[0]["rejects"] == {"error": 1}  # alice's lost reply
    assert rounds[1]["participants"] == 2  # alice rejoined
    store = RoundCheckpoints(home.run_dir / "checkpoints", keep=3)
    assert store.rounds() == [0, 1, 2] and store.load(2).meta["run-id"] == store.load(1).meta["run-id"]
    log = (home.logs / "server.log").read_text()
    assert "resuming" in log and "left running by a previous server" in log
    assert log.count("round 1 committed") == 1 and log.count("round 2 committed") == 1

    for name, (_, data) in devices.items():
        audit = audit_ledger(data)
        assert audit.all_findings == [], (name, audit.all_findings)
        with Ledger(data) as ledger:
            rows = ledger.rows(client_id=client_identity(data), unit="utterance")
        keys = [(r.run_id, r.round) for r in rows]
        assert len(keys) == len(set(keys))  # one release per attempt and round, never two
        assert 2 in {r.round for r in rows}
    with Ledger(devices["alice"][1]) as ledger:
        assert sum(r.round == 1 for r in ledger.rows()) <= 1  # killed mid-round: charged once at most


def _supernode_of(enroll_process):
    for child in psutil.Process(enroll_process.pid).children():
        if child.status() != psutil.STATUS_ZOMBIE and "flower-supernode" in " ".join(child.cmdline()):
            return child
    raise AssertionError("no SuperNode under the enroll process")


def _training_clientapp(out, enroll_process, data, nth, timeout=600.0):
    """The ClientApp process of the device's ``nth`` train message (Flower's, or a child of the
    ClientApp host), once it has opened the privacy ledger (model built, trainer ready: it trains,
    charges the ledger and replies next)."""
    started = r"Receiving: train message.*?Start `flwr-clientapp` process.*?"
    wait_for(out, "(?s)" + started * nth, enroll_process, timeout=timeout)
    ledger = str(data / "privacy_ledger.sqlite")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in psutil.Process(enroll_process.pid).children(recursive=True):
            if _has_open(process, ledger):
                return process
        time.sleep(0.05)
    raise AssertionError("no ClientApp under the enroll process opened the ledger")


def _has_open(process, path):
    try:
        return any(f.path.startswith(path) for f in process.open_files())
    except psutil.Error:  # exited meanwhile
        return False
