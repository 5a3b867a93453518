"""Single-flight: identical concurrent requests share one upstream call.

The first request for a cache key opens a `Flight` and goes upstream (the leader); later ones
with the same key await it (followers). The leader ends its flight with one of:

- an `Entry`: every follower answers with it, byte for byte;
- `PASS`: the answer was fine but can't be cached (`no-store`, too large): followers forward
  on their own, all at once;
- `FAILED`: the leader got an error or went away: followers elect a new leader among
  themselves, so an error is never handed to everyone and a retry storm never starts.

Waits are bounded by a deadline (`lock_timeout_s`); a follower that reaches it forwards on its
own and retires the flight, so a leader that never reports back can't hold a key forever
(the other followers keep waiting until their own deadlines).

`UpstreamPump` reads a streamed upstream body in a task of its own, so that a client that
disconnects (its handler task is cancelled) can't break the upstream read while followers
still wait for the answer.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

__all__ = ["Flight", "FlightBoard", "FAILED", "PASS", "TIMEOUT", "UpstreamPump"]


class _Signal:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


FAILED = _Signal("FAILED")
PASS = _Signal("PASS")
TIMEOUT = _Signal("TIMEOUT")


class Flight:
    """One upstream call in progress for a cache key, with the requests waiting on it."""

    __slots__ = ("key", "future", "followers", "lock_token")

    def __init__(self, key: str) -> None:
        self.key = key
        self.future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.followers = 0
        self.lock_token: str | None = None  # set when this flight holds the Redis lock


class FlightBoard:
    """The flights of one gateway process, by cache key."""

    def __init__(self) -> None:
        self.flights: dict[str, Flight] = {}
        self.coalesced = 0  # followers answered by a leader

    def get(self, key: str) -> Flight | None:
        return self.flights.get(key)

    def open(self, key: str) -> Flight:
        flight = Flight(key)
        self.flights[key] = flight
        return flight

    def retire(self, flight: Flight) -> None:
        """Take the flight off the board: later requests no longer join it."""
        if self.flights.get(flight.key) is flight:
            del self.flights[flight.key]

    def land(self, flight: Flight, result: Any, *, retire: bool = True) -> None:
        """Wake the followers with `result` (an Entry, PASS or FAILED)."""
        if retire:
            self.retire(flight)
        if not flight.future.done():
            flight.future.set_result(result)

    async def follow(self, flight: Flight, deadline: float) -> Any:
        """Wait for the leader's result until `deadline` (loop time); TIMEOUT when it passes."""
        if flight.future.done():
            return flight.future.result()
        flight.followers += 1
        try:
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(flight.future)
        except TimeoutError:
            self.retire(flight)  # a leader this late may be stuck: later requests start afresh
            return TIMEOUT
        finally:
            flight.followers -= 1


class _End:
    __slots__ = ("error",)

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


class UpstreamPump:
    """Reads an upstream body from its own task into a short queue.

    The client side takes chunks with `next`; if it goes away, `drain` (from another task)
    takes the rest. Nothing is read ahead beyond `read_ahead` chunks. (A deque and two waiter
    futures: asyncio.Queue's bookkeeping costs more than this needs, once per chunk.)
    """

    def __init__(self, chunks: AsyncIterator[bytes], read_ahead: int = 4) -> None:
        self.read_ahead = read_ahead
        self._items: deque[bytes | _End] = deque()
        self._reader: asyncio.Future[None] | None = None  # `next` waiting for a chunk
        self._room: asyncio.Future[None] | None = None  # the pump waiting for `next` to take one
        self._loop = asyncio.get_running_loop()
        self.task = self._loop.create_task(self._run(chunks))

    async def _run(self, chunks: AsyncIterator[bytes]) -> None:
        try:
            async for chunk in chunks:
                if len(self._items) >= self.read_ahead:
                    self._room = self._loop.create_future()
                    await self._room
                self._push(chunk)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the upstream broke: the reader sees it where the chunk would be
            self._push(_End(error))
            return
        self._push(_End())

    def _push(self, item: bytes | _End) -> None:
        self._items.append(item)
        reader = self._reader
        if reader is not None:
            self._reader = None
            if not reader.done():
                reader.set_result(None)

    async def next(self) -> bytes | None:
        """The next chunk, None at the end; raises what the upstream raised."""
        if not self._items:
            self._reader = self._loop.create_future()
            await self._reader
        item = self._items.popleft()
        room = self._room
        if room is not None:
            self._room = None
            if not room.done():
                room.set_result(None)
        if isinstance(item, _End):
            self._items.appendleft(item)  # every later call sees the end too
            if item.error is not None:
                raise item.error
            return None
        return item

    async def drain(self, into: list[bytes]) -> None:
        """Append every remaining chunk to `into`; raises if the upstream breaks."""
        while (chunk := await self.next()) is not None:
            into.append(chunk)

    def cancel(self) -> None:
        self.task.cancel()
