"""A deployment's replies are pulled every quarter second (Flower's grid waits 3 s between pulls);
the simulation's in-memory grid is left as it is."""

from __future__ import annotations

import time
from types import SimpleNamespace

from flwr.superlink.grid.http_grid import HttpGrid
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from fedvox.server.prompt_grid import REPLY_POLL_S, PromptGrid, prompt


class SlowReplies:
    """A grid whose two replies show up on the third and fifth pull."""

    def __init__(self) -> None:
        self.pulls: list[float] = []

    def push_messages(self, messages):
        return ["a", "b"]

    def pull_messages(self, message_ids):
        self.pulls.append(time.monotonic())
        ready = {3: "a", 5: "b"}.get(len(self.pulls))
        return [_reply(ready)] if ready in set(message_ids) else []


def _reply(answering: str) -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=answering))  # all the grid reads


def test_replies_are_pulled_every_poll_until_all_arrived() -> None:
    grid = SlowReplies()
    started = time.monotonic()
    replies = list(PromptGrid(grid).send_and_receive([], timeout=30))  # type: ignore[arg-type]
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b"]
    assert len(grid.pulls) == 5  # stops at the last reply
    assert time.monotonic() - started < 4 * REPLY_POLL_S + 2.0  # Flower's grid: 12 s


def test_only_a_deployments_grid_is_wrapped() -> None:
    memory = InMemoryGrid.__new__(InMemoryGrid)  # (only the kind of grid matters)
    assert prompt(memory) is memory
    deployed = HttpGrid.__new__(HttpGrid)
    assert isinstance(prompt(deployed), PromptGrid)
