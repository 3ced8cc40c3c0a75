"""A migration's extra connections, joining it (migrate --parallel-connections).

The sender opens them after its migrate request was accepted and before
`stream`; each authenticates like any connection, then says `join` with the
migration's id and its number.  The receiving job waits for all of them
before its restore helper starts, and closes them when it is done.
"""

from __future__ import annotations

import trio

from ..host import ToolstackError
from .link import MigrationLink


class Joining:
    """The extra connections migration `migration_id` expects (numbers 1..count)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.links: dict[int, MigrationLink] = {}
        self._all_here = trio.Event()
        if count == 0:
            self._all_here.set()  # one connection: nobody to wait for
        self.closed = False

    def add(self, index: int, link: MigrationLink) -> None:
        if self.closed or not 1 <= index <= self.count or index in self.links:
            raise ToolstackError(f"no extra connection {index} is expected")
        self.links[index] = link
        if len(self.links) == self.count:
            self._all_here.set()

    async def wait(self, seconds: float) -> list[MigrationLink]:
        """Every extra connection, in order; ToolstackError when some did not come."""
        with trio.move_on_after(seconds):
            await self._all_here.wait()
        if len(self.links) < self.count:
            raise ToolstackError(
                f"{self.count - len(self.links)} of the sender's {self.count} extra "
                f"connections did not join within {seconds:g} s"
            )
        return [self.links[i] for i in range(1, self.count + 1)]

    async def aclose(self) -> None:
        self.closed = True
        for link in self.links.values():
            await link.aclose()
