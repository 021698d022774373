"""A deployment's replies collected as they arrive.

Flower 1.41's deployment grid (``HttpGrid.send_and_receive``) asks the SuperLink for replies
every 3 s, so every message round trip waits 1.5 s on average, 3 s at worst, after the last
device answered. :class:`PromptGrid` keeps that grid for everything and polls every
:data:`REPLY_POLL_S` instead: one small loopback request to the SuperLink each time (faster
polls cost a small shared machine more than they save). The
simulation's in-memory grid already polls every 0.1 s and is used as it is.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.superlink.grid.http_grid import HttpGrid

REPLY_POLL_S = 0.5


class PromptGrid(Grid):
    """``grid`` with replies pulled every ``poll_s`` seconds (everything else is ``grid``'s)."""

    def __init__(self, grid: Grid, poll_s: float = REPLY_POLL_S) -> None:
        self.grid = grid
        self.poll_s = poll_s

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``, then pull their replies until all arrived or ``timeout`` passed (as Flower's)."""
        waiting = set(self.push_messages(messages))
        end = time.time() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while waiting and (timeout is None or time.time() < end):
            pulled = list(self.pull_messages(waiting))
            replies += pulled
            waiting -= {m.metadata.reply_to_message_id for m in pulled}
            if waiting:
                time.sleep(self.poll_s)
        return replies


def prompt(grid: Grid) -> Grid:
    """The grid to run a federation on: a deployment's polls promptly, anything else is unchanged."""
    return PromptGrid(grid) if isinstance(grid, HttpGrid) else grid


__all__ = ["REPLY_POLL_S", "PromptGrid", "prompt"]
