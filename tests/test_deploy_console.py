"""What ``fedvox-server start`` shows of the ServerApp's log: warnings and errors once, with the
device's registered name; Flower's per-round narration and metric dictionaries stay in run.log."""

import logging

from fedvox.server.deploy.launcher import ServerAppConsole

# As Flower streams it: its own lines, the root logger's echo of each (Opacus' basicConfig), a
# metric dictionary over several lines, and fedvox's warnings in the root form only.
STREAM = """\
\x1b[92mINFO \x1b[0m:      [ROUND 3/11]
12/06/2026 14:01:02:INFO:[ROUND 3/11]
INFO :      aggregate_train: Received 1 results and 1 failures
INFO :      \t└──> Aggregated MetricRecord: {'train-loss': 2.31,
  'peak-memory-bytes-max': 1.2e9,
  'step-time-s-mean': 0.8}
12/06/2026 14:01:03:WARNING:node 7 replied with an error: Node Unavailable
WARNING :   No fit_metrics_aggregation_fn provided
12/06/2026 14:01:03:WARNING:No fit_metrics_aggregation_fn provided
12/06/2026 14:01:04:WARNING:round 3: 1 update(s) not used: error
12/06/2026 14:01:09:WARNING:node 7 replied with an error: Node Unavailable
"""


def test_only_warnings_reach_the_console_once_each_naming_the_device():
    console = ServerAppConsole({7: "alice"})
    shown = console.lines(STREAM)
    assert shown == [
        (logging.WARNING, "device alice (node 7) replied with an error: Node Unavailable"),
        (logging.WARNING, "No fit_metrics_aggregation_fn provided"),
        (logging.WARNING, "round 3: 1 update(s) not used: error"),
        (logging.WARNING, "device alice (node 7) replied with an error: Node Unavailable"),  # the next one, again
    ]
    assert not any("INFO" in message or "train-loss" in message for _, message in shown)


def test_a_node_without_a_registered_name_keeps_its_id():
    assert ServerAppConsole().lines("ERROR :      node 12 sent no valid status") == [
        (logging.ERROR, "node 12 sent no valid status")
    ]
