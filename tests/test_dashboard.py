"""The operator's dashboard on a run the real server code wrote: its credential, its numbers, its
live updates, its register action, and the page as headless Chromium renders it."""

import json
import os
import re
import shutil
import subprocess

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from starlette.testclient import TestClient

from fedvox.server.checkpoints import RoundCheckpoints
from fedvox.server.dashboard import serve_dashboard
from fedvox.server.dashboard.view import open_source, rounds_left, snapshot
from fedvox.server.dashboard.web import COOKIE, credential, dashboard_app
from fedvox.server.deploy.devices import Registry, WaitingRoom, register_key
from fedvox.server.deploy.home import init_home, write_run_config
from fedvox.server.run import FederatedRun
from fedvox.shared.device_keys import fingerprint, ssh_text
from fedvox.shared.runconfig import RunConfig
from tests.federation_kit import LocalGrid, initial_state, make_client_app
from tests.tiny import TINY

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--hide-scrollbars",
]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A server home whose run the real server code wrote: two registered devices (alice, bob),
    two rounds with evaluation and speaker-level DP, and a stranger's key waiting."""
    root = tmp_path_factory.mktemp("dashboard")
    home = init_home(root / "home", ["localhost"], host="127.0.0.1")
    config = RunConfig.from_flat(
        {
            **TINY,
            "checkpoint-dir": str(home.run_dir),
            "num-server-rounds": 2,
            "learning-rate": 0.05,
            "speaker-dp.enabled": True,
            "client-budget-epsilon": 50.0,
        }
    )
    write_run_config(home, config)
    grid = LocalGrid(make_client_app(root / "clients"), num_nodes=2)
    registry = Registry(home)
    for name, node_id in zip(("alice", "bob"), grid.node_ids, strict=True):
        registry.add(ssh_text(ec.generate_private_key(ec.SECP384R1()).public_key()), name)
        registry.record_node(name, node_id)
    FederatedRun(config, initial_state(), seed=0).execute(grid)
    stranger = ec.generate_private_key(ec.SECP384R1())
    WaitingRoom(home).note(public_key_to_bytes(stranger.public_key()))
    return home


def _rows(home):
    return [json.loads(line) for line in (home.run_dir / "metrics.jsonl").read_text().splitlines()]


def _last_epsilon(home, name):
    node_ids = {n for d in Registry(home).devices() if d.name == name for n in d.node_ids}
    return [c["epsilon-spent"] for r in _rows(home) for c in r["clients"] if c["node-id"] in node_ids][-1]


def test_the_snapshot_holds_the_runs_numbers(home):
    data = snapshot(open_source(home.root))
    rows = _rows(home)
    assert [r["round"] for r in data["rounds"]] == [1, 2] and data["committed"] == 2 and data["target-rounds"] == 2
    assert [r["accepted"] for r in data["rounds"]] == [r["participants"] for r in rows]
    assert [r["bytes-up"] for r in data["rounds"]] == [r["bytes-up"] for r in rows]
    devices = {d["name"]: d for d in data["devices"]}
    assert set(devices) == {"alice", "bob"} and devices["alice"]["epsilon-spent"] == _last_epsilon(home, "alice")
    assert [p[1] for p in data["epsilon"]["series"]["bob"]][-1] == _last_epsilon(home, "bob")
    assert data["epsilon"]["budgets"] == {"alice": 50.0, "bob": 50.0}
    assert devices["alice"]["rounds-left"] >= 1 and data["speakers"]["count"] == 2
    released = {key for r in rows for key in r if key.endswith("-loss")}  # what the privacy policy lets out
    assert data["losses"] == {key: [[r["round"], r[key]] for r in rows if key in r] for key in released}
    chosen, why = RoundCheckpoints(home.run_dir / "checkpoints", keep=1).export_choice()
    assert data["export"] == {"round": chosen, "why": why}
    assert [w["attempts"] for w in data["waiting"]] == [1]


def test_rounds_left_is_what_the_budget_allows_at_the_next_rounds_cost():
    assert rounds_left({"epsilon-spent": 2.0, "epsilon-budget": 10.0, "epsilon-next": 3.5}) == 5
    assert rounds_left({"epsilon-spent": 9.0, "epsilon-budget": 10.0, "epsilon-next": 10.5}) == 0
    assert rounds_left({"epsilon-spent": 0.0, "epsilon-budget": 10.0, "epsilon-next": float("inf")}) == 0
    assert rounds_left({"epsilon-spent": 1.0, "epsilon-budget": 10.0}) is None


def test_nothing_is_served_without_the_homes_credential(home):
    source = open_source(home.root)
    token = credential(source)
    assert oct((home.state / "dashboard.token").stat().st_mode & 0o777) == "0o600"
    with TestClient(dashboard_app(source, token, ["testserver"]), base_url="http://testserver") as client:
        for path in ("/", "/api/snapshot", "/api/events", "/static/dashboard.js", "/?token=wrong"):
            assert client.get(path).status_code == 401, path
        assert client.get("/api/snapshot", headers={"authorization": "Bearer wrong"}).status_code == 401
        entered = client.get(f"/?token={token}", follow_redirects=False)
        assert entered.status_code == 303 and entered.headers["location"] == "/"
        cookie = entered.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert client.get("/").status_code == 200 and client.get("/api/snapshot").json()["committed"] == 2
    with TestClient(dashboard_app(source, token, ["127.0.0.1"]), base_url="http://rebound.example") as client:
        assert client.get("/api/snapshot", headers={"authorization": f"Bearer {token}"}).status_code == 401


def test_updates_stream_and_a_waiting_device_is_registered_only_by_a_deliberate_request(home, tmp_path):
    copy = init_home(tmp_path / "home", ["localhost"])
    shutil.copytree(home.run_dir, copy.run_dir, dirs_exist_ok=True)
    stranger = ec.generate_private_key(ec.SECP384R1())
    WaitingRoom(copy).note(public_key_to_bytes(stranger.public_key()))
    key_print = fingerprint(stranger.public_key())
    source = open_source(copy.root)
    token = credential(source)
    server, url = serve_dashboard(source, register=lambda fp, name: register_key(copy, fp, name, None))
    try:
        with httpx.stream(
            "GET", url.split("?")[0] + "api/events", headers={"authorization": f"Bearer {token}"}, timeout=60
        ) as events:
            first = next(line for line in events.iter_lines() if line.startswith("data: "))
        assert json.loads(first[len("data: ") :])["committed"] == 2
    finally:
        server.stop()
    app = dashboard_app(source, token, ["testserver"], register=lambda fp, name: register_key(copy, fp, name, None))
    with TestClient(app, base_url="http://testserver", cookies={COOKIE: token}) as client:
        body = {"fingerprint": key_print, "name": "carol"}
        assert client.post("/api/register", json=body).status_code == 403  # no action header: a cross-site form
        done = client.post("/api/register", json=body, headers={"x-fedvox-action": "register"})
        assert done.status_code == 200 and "registered carol" in done.json()["done"][0]
        assert client.get("/api/snapshot").json()["waiting"] == []


def _chromium() -> str:
    """Debian's chromium, installed here when missing (root with apt), else the test is skipped."""
    found = shutil.which("chromium")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"],
            env=env,
            capture_output=True,
            timeout=1200,
        )
        found = shutil.which("chromium")
    if found is None:
        pytest.skip("headless Chromium is not installed and cannot be (not root, or apt-get has no chromium)")
    return found


def _browse(chromium: str, url: str, profile, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url],
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_the_page_renders_rounds_epsilon_per_device_and_devices_in_chromium(home, tmp_path):
    chromium = _chromium()
    server, url = serve_dashboard(open_source(home.root))
    try:
        refused = _browse(chromium, url.split("?")[0], tmp_path / "profile-0", "--dump-dom")
        assert "needs its credential" in refused.stdout and "epsilon-chart" not in refused.stdout
        assert httpx.get(url.split("?")[0] + "api/snapshot").status_code == 401

        dom = _browse(chromium, url, tmp_path / "profile-1", "--dump-dom").stdout
        rows = _rows(home)
        rounds_table = re.search(r'<table id="rounds">(.*?)</table>', dom, re.S).group(1)
        for row in rows:
            cells = "".join(f'<td class="">{row[key]}</td>' for key in ("round", "selected", "participants"))
            assert cells in rounds_table, rounds_table[:2000]
        epsilon = re.search(r'<figure id="epsilon-chart"[^>]*data-series="([^"]*)"', dom)
        series = json.loads(epsilon.group(1).replace("&quot;", '"'))
        assert {name: series[name][-1][1] for name in ("alice", "bob")} == {
            name: _last_epsilon(home, name) for name in ("alice", "bob")
        }
        chart = dom[dom.index('<figure id="epsilon-chart"') :]
        assert "<canvas" in chart[: chart.index("</figure>")]  # uPlot drew it
        devices_table = re.search(r'<table id="devices">(.*?)</table>', dom, re.S).group(1)
        for name in ("alice", "bob"):
            assert f'<td class="text">{name}</td>' in devices_table
            assert f"{_last_epsilon(home, name):.3f}" in devices_table
        assert fingerprint_of_waiting(home) in dom

        shot = tmp_path / "dashboard.png"
        _browse(chromium, url, tmp_path / "profile-2", f"--screenshot={shot}", "--window-size=1280,2300")
        assert shot.is_file() and shot.stat().st_size > 10_000
        if target := os.environ.get("FEDVOX_DASHBOARD_SCREENSHOT"):  # docs/deployment.md's figure
            shutil.copy(shot, target)
    finally:
        server.stop()


def fingerprint_of_waiting(home) -> str:
    (waiting,) = WaitingRoom(home).waiting()
    return waiting["fingerprint"]


def test_a_simulation_output_is_served_run_by_run(home, tmp_path):
    out = tmp_path / "sim"
    run = out / "runs" / "base"
    shutil.copytree(home.run_dir, run / "server")
    scores = {"1": {"seen": 3.0, "unseen": 3.5}, "2": {"seen": 2.5, "unseen": 3.2}}
    (run / "evaluation.json").write_text(json.dumps({"global": scores}))
    (run / "sample").mkdir()
    (run / "sample" / "sample.wav").write_bytes(b"RIFF")
    (run / "sample" / "sample.json").write_text(json.dumps({"wav": "sample.wav", "round": 2, "text": "hello"}))
    data = snapshot(open_source(out))
    assert data["runs"] == ["base"] and data["losses"]["held-out seen"] == [[1, 3.0], [2, 2.5]]
    assert data["samples"] == [{"url": "audio/base/sample/sample.wav", "round": 2, "text": "hello"}]
    assert {d["name"] for d in data["devices"]} == {"speaker-0", "speaker-1"}
