"""Fair use of the upstream model: it generates CHAT_UPSTREAM_SLOTS replies at once, and
every one more only makes all of them slower, so a reply takes a *slot* for its upstream
request and gives it back when the request ends.

With no slot free, a reply waits in the queue of its client address, and a freed slot goes
to the waiting address served least recently (round-robin): a classroom behind one NAT
address is served one reply after another, and a second address in between, not after all
of them. One address holds at most CHAT_UPSTREAM_SLOTS_PER_CLIENT slots at once, and never
all of them, so the others find one free whatever one address does.

Where fairness ends: when a few addresses together hold every slot (two with two each, by
default), a newcomer waits for the first of their replies to end (at most the reply's bounds)
and is served next. Nothing here keeps a slot free for it, nor stops a reply someone watches:
a kept slot sits idle whenever two visitors are busy, halving a classroom's pace (review 10
measured it), and stopping replies would let one client cut other people's replies at will.

Resume gives way under load: while replies wait, replies nobody watches (their asker gone,
kept running only so that they can be resumed) are stopped, the oldest first, one for each
waiting reply that could take its slot, as at the end of the resume window: each is stored
as far as it got. A waiting reply nobody watches any more leaves the line (LiveReply does that).

The slots are per process (per worker): with N workers in front of one model, give each its share.
"""

import asyncio
import itertools
from collections import Counter, deque
from contextlib import asynccontextmanager


class UpstreamSlots:
    """This process's share of the upstream model: who holds a slot, who waits, in turn."""

    def __init__(self, capacity: int, per_client: int):
        # One address never holds every slot (when there are two or more): with 2 slots a
        # worker, the split of 4 across 2 workers, 2 per address would be all of them.
        self.capacity, self.per_client = capacity, min(per_client, max(1, capacity - 1))
        self.holders: dict = {}  # LiveReply -> its client address
        self.held: Counter[str] = Counter()  # slots held, per address
        self.waiting: dict[str, deque[tuple]] = {}  # per address, its waiting replies in order
        # When each address holding or waiting was last given a slot: the next slot goes to
        # the one served least recently. (An address that neither holds nor waits is forgotten.)
        self.served: dict[str, int] = {}
        self.clock = itertools.count()

    @asynccontextmanager
    async def slot(self, reply, address: str):
        """Hold a slot for `reply` while the block runs (waiting for one first if need be)."""
        await self.acquire(reply, address)
        try:
            yield
        finally:
            self.release(reply)

    async def acquire(self, reply, address: str) -> None:
        if address not in self.waiting and self.has_room(address):
            self.grant(reply, address)
            return
        granted = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(address, deque()).append((reply, granted))
        self.make_room()
        try:
            await granted
        except asyncio.CancelledError:  # Stop, or nobody watches it any more, while it waited
            if granted.done() and not granted.cancelled():
                self.release(reply)  # the slot came just as it was cancelled: pass it on
            else:
                self.unqueue(address, (reply, granted))
            raise

    def unqueue(self, address: str, entry: tuple) -> None:
        queue = self.waiting.get(address)
        if queue is not None and entry in queue:
            queue.remove(entry)
            if not queue:
                del self.waiting[address]
                self.forget_if_idle(address)

    def has_room(self, address: str) -> bool:
        return len(self.holders) < self.capacity and self.held[address] < self.per_client

    def room_for(self, address: str) -> int:
        """How many replies of `address` asking now would get a slot at once (none while some
        of its replies wait in line: a new one queues behind them)."""
        if address in self.waiting:
            return 0
        return max(0, min(self.capacity - len(self.holders), self.per_client - self.held[address]))

    def grant(self, reply, address: str) -> None:
        self.holders[reply] = address
        self.held[address] += 1
        self.served[address] = next(self.clock)

    def release(self, reply) -> None:
        address = self.holders.pop(reply, None)
        if address is not None:
            self.held[address] -= 1
            self.forget_if_idle(address)
            self.serve()

    def forget_if_idle(self, address: str) -> None:
        if not self.held[address] and address not in self.waiting:
            self.held.pop(address, None)
            self.served.pop(address, None)

    def serve(self) -> None:
        """Hand the free slots to the waiting replies, the address served least recently first."""
        while True:
            ready = [address for address in self.waiting if self.has_room(address)]
            if not ready:
                return
            address = min(ready, key=lambda a: self.served.get(a, -1))
            queue = self.waiting[address]
            reply, granted = queue.popleft()
            if not queue:
                del self.waiting[address]
            if not granted.cancelled():  # (one cancelled while it waited is simply dropped)
                self.grant(reply, address)
                granted.set_result(None)
            else:
                self.forget_if_idle(address)

    @property
    def contended(self) -> bool:
        """Some reply waits for a slot."""
        return bool(self.waiting)

    def holds(self, reply) -> bool:
        return reply in self.holders

    def waits(self, reply) -> bool:
        return any(entry[0] is reply for queue in self.waiting.values() for entry in queue)

    def make_room(self) -> None:
        """For each waiting reply, stop one reply nobody watches whose slot it could take:
        any, when all slots are taken; its own address's, when that holds all it may. One
        already stopping (its slot is on its way back) counts for one waiting reply."""
        on_the_way = sum(reply.stop_requested.is_set() for reply in self.holders)
        for address, queue in self.waiting.items():
            own_only = self.held[address] >= self.per_client
            for _ in queue:
                if on_the_way:
                    on_the_way -= 1
                    continue
                victim = next(
                    (
                        reply
                        for reply, holder in self.holders.items()  # the oldest first
                        if not reply.watched
                        and not reply.stop_requested.is_set()
                        and (holder == address or not own_only)
                    ),
                    None,
                )
                if victim is None:
                    break
                victim.stop()
