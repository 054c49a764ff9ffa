"""One writer per run: a lease in the store (runs/<id>/lease.json) that a trainer takes before it trains, renews
while it trains, and gives back when it stops.

A pod retried while its predecessor still runs (a node that lost its network keeps its pod alive), or two
`rethink run` calls on one store, would otherwise train the same run twice and overwrite each other's
checkpoints. The lease names its holder and expires `ttl` seconds after its last renewal; it is taken and
renewed with the store's conditional writes (`Store.write_if`: an S3 conditional PUT, a flock'ed compare and
write locally), so of two trainers exactly one holds it. A holder that finds its lease taken over (it was away
longer than the ttl) stops before it writes anything more (LeaseLost). A hard-killed holder leaves its lease to
expire: its successor waits at most `ttl` for it, or not at all when the holder was a process of this machine
(same host and process namespace) that no longer exists. A holder of this machine that is alive keeps the run
even when its lease ran out (a long evaluation between two renewals): only its own death frees it.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field

from rethink.errors import Stopped, UserError
from rethink.store.base import Store
from rethink.store.runs import run_key

LEASE = "lease.json"


class LeaseHeld(UserError):
    """Another live trainer holds the run's lease."""

    exit_code = 4
    failure = False  # the run is that trainer's


class LeaseLost(Stopped):
    """This trainer's lease was taken over: another writer trains the run now; stop without writing."""

    exit_code = 4


def default_holder() -> str:
    """Who this process is, for humans: host, pid and a random suffix (unique across retries of one pod)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat), or None: with the pid, this names one
    process even when pids (and namespace numbers) are reused, as they are by restarted containers."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def local_holder_alive(record: dict) -> bool | None:
    """Whether a lease's holder is a live process of this machine (True), a dead one (False), or elsewhere
    (None: only its lease's expiry can tell)."""
    if (record.get("host") != socket.gethostname() or record.get("pidns") is None
            or record["pidns"] != _pid_namespace() or record.get("started") is None):  # fmt: skip
        return None
    try:
        pid = int(record.get("pid", -1))
    except (TypeError, ValueError):
        return None
    return _process_start(pid) == record["started"]


@dataclass
class Lease:
    """The lease of one run, as seen from one trainer."""

    store: Store
    run_id: str
    ttl: float = 300.0
    holder: str = field(default_factory=default_holder)
    clock: object = time.time  # wall-clock seconds: expiry is compared across machines
    version: str | None = None  # of our last write; None while we do not hold the lease
    renewed: float = 0.0

    @property
    def key(self) -> str:
        return run_key(self.run_id, LEASE)

    def _record(self, expires: float) -> bytes:
        now = self.clock()
        return json.dumps({"holder": self.holder, "expires": expires, "renewed": now, "ttl": self.ttl,
                           "host": socket.gethostname(), "pid": os.getpid(), "pidns": _pid_namespace(),
                           "started": _process_start(os.getpid())}).encode()  # fmt: skip

    def _held_by_other(self, record: dict | None) -> bool:
        if record is None or record.get("holder") == self.holder or record.get("expires", 0) == 0.0:
            return False  # free, ours, or given back
        alive = local_holder_alive(record)
        return alive if alive is not None else record["expires"] > self.clock()

    def current(self) -> tuple[dict | None, str | None]:
        """The lease record in the store (None when there is none, or an unreadable one: it is free) and its
        version."""
        data, version = self.store.read_versioned(self.key)
        if data is None:
            return None, None
        try:
            record = json.loads(data)
            if not isinstance(record, dict) or not isinstance(record.get("expires"), (int, float)):
                raise ValueError
        except ValueError:
            return {"holder": "?", "expires": 0.0}, version
        return record, version

    def try_acquire(self) -> dict | None:
        """Take the lease when it is free, expired or already ours; None then, else the holder's record."""
        record, version = self.current()
        if self._held_by_other(record):
            return record
        new = self.store.write_if(self.key, self._record(self.clock() + self.ttl), version)
        if new is None:  # someone was faster
            return self.current()[0] or {"holder": "?", "expires": self.clock() + self.ttl}
        self.version, self.renewed = new, self.clock()
        return None

    def acquire(self, wait: float, poll: float = 5.0, finished=lambda: False, log=print) -> bool:
        """Take the lease, waiting up to `wait` seconds for its holder to give it back or let it expire.

        Returns False when `finished()` turned true while waiting (the other trainer finished the run); raises
        LeaseHeld when the wait is over and the holder is still there.
        """
        deadline = self.clock() + wait
        said = False
        while True:
            holder = self.try_acquire()
            if holder is None:
                return True
            if finished():
                return False
            if self.clock() >= deadline:
                raise LeaseHeld(
                    f"run {self.run_id} is being trained by {holder.get('holder')} (its lease runs until "
                    f"{time.strftime('%H:%M:%S', time.localtime(holder['expires']))}): not training it twice; "
                    f"run this again later, or delete {self.store.where(self.key)} if that trainer is gone"
                )
            if not said:
                log(f"run {self.run_id}: waiting for {holder.get('holder')}, which holds its lease (up to "
                    f"{wait:.0f}s)")  # fmt: skip
                said = True
            time.sleep(max(0.05, min(poll, deadline - self.clock())))

    def renew(self, force: bool = False) -> None:
        """Extend the lease (at most every ttl/3 seconds unless `force`); LeaseLost when it is no longer ours."""
        if self.version is None:
            return
        now = self.clock()
        if not force and now - self.renewed < self.ttl / 3:
            return
        new = self.store.write_if(self.key, self._record(now + self.ttl), self.version)
        if new is None:
            holder = (self.current()[0] or {}).get("holder", "?")
            self.version = None
            raise LeaseLost(f"run {self.run_id}: its lease was taken over by {holder} (this trainer was away longer "
                            f"than the lease's {self.ttl:.0f}s); stopping without writing")  # fmt: skip
        self.version, self.renewed = new, now

    def release(self) -> None:
        """Give the lease back (an expired record, written only if it is still ours)."""
        if self.version is not None:
            self.store.write_if(self.key, self._record(0.0), self.version)
            self.version = None
