"""A pool of reused threads for ``ThreadingMixIn``.

The standard library starts one thread per connection.  This pool keeps
finished threads waiting for the next job instead:

- a new thread starts only when every existing one is busy (so, unbounded
  by default, a handler that waits on another connection never deadlocks);
- an idle thread retires after ``idle_timeout`` seconds;
- with ``max_threads`` set, jobs beyond it wait in a FIFO queue of at most
  ``max_queued`` jobs; ``submit`` blocks while that queue is full (so the
  accept loop stops and the kernel's backlog holds further connections)
  until a thread frees up or ``interrupt()`` finds it cancelled;
  ``wait_for_room`` tells how many jobs it would take without waiting, so a
  caller can take no more connections than that;
- an exception that is not an ``Exception`` (``SystemExit``,
  ``KeyboardInterrupt``) ends the thread that ran the job, as it ends a
  thread of the stdlib, so ``threading.excepthook`` sees it;
- bookkeeping is bounded: the pool remembers its live threads only;
- at interpreter exit, idle threads leave at once (busy ones finish first).

``LeaderPool`` adds leader/follower: idle threads wait for work in a
source themselves (a listener, in the core) instead of in this pool's queue.
"""

from __future__ import annotations

import collections
import threading
import time
import weakref
from typing import Any, Callable, Deque, Dict, List, Optional, Protocol, Set, Tuple

__all__ = ["WorkerPool", "LeaderPool"]

_Job = Tuple[Callable[..., Any], Tuple[Any, ...]]

#: Seconds _start() waits, after Thread.start() was interrupted, to tell
#: whether the thread was made.
_START_GRACE = 5.0

#: Seconds join() waits at a time for a thread that is being started (it
#: checks again whether the thread is still the pool's in between).
_START_STEP = 0.05

#: Every pool, so that idle threads can leave at interpreter exit.
_pools: "weakref.WeakSet[WorkerPool]" = weakref.WeakSet()


def _close_all_pools() -> None:
    # Runs before the interpreter joins non-daemon threads: idle ones exit
    # now instead of after idle_timeout; busy ones finish their job first,
    # as the stdlib's per-request threads do.
    for pool in list(_pools):
        pool.close()


# threading._register_atexit (3.9+, what concurrent.futures uses) runs
# before threading._shutdown joins the threads; atexit would run after.
_register = getattr(threading, "_register_atexit", None)
if _register is not None:
    _register(_close_all_pools)


class WorkerPool:
    """Run jobs on reused threads; see the module docstring.

    Methods for the caller: submit(), interrupt(), close(), join(), len(),
    running(), cancel_queued(), wait_idle(), stop_waiting().
    """

    def __init__(self, *, name: str = "fastlisten-pool", daemon: bool = False,
                 idle_timeout: float = 5.0, max_threads: Optional[int] = None,
                 max_queued: Optional[int] = None) -> None:
        if max_threads is not None and max_threads < 1:
            raise ValueError(f"max_threads must be None or at least 1, not {max_threads}")
        self._name = name
        self.daemon = daemon
        self.idle_timeout = idle_timeout
        self.max_threads = max_threads
        if max_queued is not None and max_queued < 1:
            raise ValueError(f"max_queued must be None or at least 1, not {max_queued}")
        self.max_queued = max_queued if max_queued is not None else (max_threads or 1)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)          # workers wait on it
        self._room = threading.Condition(self._lock)          # submit() waits on it (same lock)
        self._done = threading.Condition(self._lock)          # wait_idle() waits on it
        self._jobs: Deque[_Job] = collections.deque()
        self._threads: Set[threading.Thread] = set()
        # threads running a job now, with the job's arguments
        self._busy: Dict[threading.Thread, Tuple[Any, ...]] = {}
        #: The most jobs that ran at once.
        self.peak = 0
        self._idle = 0          # threads waiting for a job
        self._stop_waiting = False
        self._idle_waiters = 0  # wait_idle() calls waiting on _done
        self._closed = False
        self._serial = 0
        _pools.add(self)

    def __len__(self) -> int:
        """The number of live threads."""
        with self._cond:
            return len(self._threads)

    @property
    def busy(self) -> int:
        """Jobs running now."""
        return len(self._busy)

    def busy_threads(self) -> List[threading.Thread]:
        """The threads running a job now."""
        with self._cond:
            return list(self._busy)

    def running(self) -> List[Tuple[Any, ...]]:
        """The arguments of the jobs running now."""
        with self._cond:
            return list(self._busy.values())

    def cancel_queued(self) -> List[Tuple[Any, ...]]:
        """Take the jobs that wait for a thread off the queue, unrun; returns
        their arguments (the caller disposes of them)."""
        with self._cond:
            jobs = [args for _, args in self._jobs]
            self._jobs.clear()
            self._room.notify_all()
            self._cond.notify_all()
            return jobs

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Wait up to ``timeout`` seconds (None: for ever), or until
        stop_waiting() is called, for no job to run or wait; True if that
        happened."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._busy or self._jobs:
                left = None if deadline is None else deadline - time.monotonic()
                if self._stop_waiting or (left is not None and left <= 0):
                    return False
                self._idle_waiters += 1
                try:
                    self._done.wait(left)
                finally:
                    self._idle_waiters -= 1
            return True

    def stop_waiting(self) -> None:
        """Make a wait_idle() in progress, or one that starts before the
        pool is next idle, return now (so that a stop asked just before a
        wait began is not lost)."""
        with self._cond:
            self._stop_waiting = True
            self._done.notify_all()

    @property
    def queued(self) -> int:
        """Jobs waiting for a thread (only ever non-zero with max_threads)."""
        return len(self._jobs)

    def submit(self, fn: Callable[..., Any], *args: Any,
               cancelled: Optional[Callable[[], bool]] = None) -> bool:
        """Run ``fn(*args)`` on a pool thread.  Returns False, without running
        it, if the pool is closed, or if ``cancelled()`` is true when a wait
        for room in the queue begins or is interrupted (see interrupt())."""
        with self._cond:
            while True:
                if self._closed:
                    return False
                if self._idle > len(self._jobs):
                    self._jobs.append((fn, args))
                    self._cond.notify()
                    return True
                if self.max_threads is None or len(self._threads) < self.max_threads:
                    thread = self._new_thread((fn, args))
                    break
                if len(self._jobs) < self.max_queued:
                    self._jobs.append((fn, args))
                    return True
                if cancelled is not None and cancelled():
                    return False
                self._room.wait()
        self._start(thread)
        return True

    def holds(self, arg: Any) -> bool:
        """True if a job queued or running now has ``arg`` among its
        arguments (it is the job's to dispose of)."""
        with self._cond:
            return any(arg in args for args in self._busy.values()) or any(
                arg in args for _, args in self._jobs)

    def wait_for_room(self, cancelled: Optional[Callable[[], bool]] = None) -> int:
        """How many jobs submit() would take now without waiting: with
        max_threads, max_threads + max_queued less the jobs running or
        queued; -1 for no limit (no max_threads, or a closed pool, whose
        submit() refuses at once).  While that is 0, wait (as submit()
        does) until it is not; 0 if ``cancelled()`` is true when the wait
        begins or is interrupted."""
        if self.max_threads is None:
            return -1
        with self._cond:
            while True:
                if self._closed:
                    return -1
                room = self.max_threads + self.max_queued - len(self._busy) - len(self._jobs)
                if room > 0:
                    return room
                if cancelled is not None and cancelled():
                    return 0
                self._room.wait()

    def interrupt(self) -> None:
        """Wake a submit() waiting for room, so that it checks ``cancelled``."""
        with self._cond:
            self._room.notify_all()

    def close(self) -> None:
        """Take no more jobs; queued ones still run, then the threads exit."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            self._room.notify_all()

    def join(self, timeout: Optional[float] = None) -> None:
        """close(), then wait (up to ``timeout`` seconds; None: for ever) for
        every job to finish and every other thread of the pool to exit."""
        self.close()
        deadline = None if timeout is None else time.monotonic() + timeout
        me = threading.current_thread()
        while True:
            with self._cond:
                others = [t for t in self._threads if t is not me]
            if not others:
                return
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            t = others[0]
            started = getattr(t, "_started", None)
            if started is not None and not started.is_set():
                # made under the lock and started just after it (a follower
                # spawned as the pool stopped leading): wait for it to run,
                # or to be forgotten (_start) if it cannot start
                started.wait(_START_STEP if left is None else min(left, _START_STEP))
                continue
            t.join(left)

    def _new_thread(self, job: _Job) -> threading.Thread:
        """A thread for job, counted as live and busy.  Called with the lock
        held; start it with _start() once the lock is released (start()
        waits for the thread, which must not keep finishing ones from the
        lock)."""
        self._serial += 1
        t = threading.Thread(target=self._run, args=(job,),
                             name=f"{self._name}-{self._serial}", daemon=self.daemon)
        self._threads.add(t)
        self._mark_busy(t, job[1])
        return t

    def _mark_busy(self, t: threading.Thread, args: Tuple[Any, ...]) -> None:
        """Called with the lock held."""
        self._busy[t] = args
        if len(self._busy) > self.peak:
            self.peak = len(self._busy)

    def _start(self, t: threading.Thread) -> None:
        try:
            t.start()
        except BaseException as exc:
            # A signal handler that raises (KeyboardInterrupt) may interrupt
            # start() after the thread was made, while start() waits for it
            # to run: that thread runs its job (holds() says so).  If the
            # thread is not running within a few seconds, it was never made.
            started = getattr(t, "_started", None)
            if (isinstance(exc, RuntimeError) or started is None
                    or not started.wait(_START_GRACE)):
                with self._cond:
                    self._threads.discard(t)
                    self._busy.pop(t, None)
            raise

    def _next_job(self) -> Optional[_Job]:
        """Wait for a job; None means retire.  Called with the lock held."""
        self._idle += 1
        deadline = time.monotonic() + self.idle_timeout
        try:
            while not self._jobs:
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    return None
                self._cond.wait(left)
            job = self._jobs.popleft()
            self._room.notify()   # a submit() may wait for room
            return job
        finally:
            self._idle -= 1

    def _run(self, job: Optional[_Job]) -> None:
        me = threading.current_thread()
        try:
            while job is not None:
                fn, args = job
                job = None
                try:
                    fn(*args)
                finally:
                    # Drop references before waiting, so that a finished
                    # request's objects can be collected at once.
                    del fn, args
                    with self._cond:
                        del self._busy[me]
                        if not self._busy and not self._jobs:
                            self._stop_waiting = False     # idle: that stop is served
                            if self._idle_waiters:
                                self._done.notify_all()
                with self._cond:
                    job = self._next_job()
                    if job is not None:
                        self._mark_busy(me, job[1])
        finally:
            replacement = None
            with self._cond:
                self._threads.discard(me)
                self._busy.pop(me, None)
                # A thread ended by SystemExit & co. must not strand queued jobs.
                if len(self._jobs) > self._idle:
                    replacement = self._new_thread(self._jobs.popleft())
                    self._room.notify()     # a submit() may wait for that room
            if replacement is not None:
                self._start(replacement)


class Source(Protocol):
    """Where LeaderPool threads take work from themselves (see LeaderPool.lead)."""

    def open(self, timeout: float) -> Tuple[Callable[[], List[Tuple[Any, ...]]],
                                            Callable[[], None]]:
        """Per thread, in that thread: (accept, close).  accept() waits up to
        ``timeout`` seconds and returns [] or [args] (args: what run() takes
        and running() reports); close() frees what open() made."""

    def run(self, *args: Any) -> None:
        """Handle one item that accept() returned."""

    def empty(self) -> None:
        """accept() returned nothing (a timeout, a stop, another thread was first)."""

    def interrupt(self) -> None:
        """Make every waiting accept() return now, and every later one at
        once (the pool was closed)."""

    def failed(self, exc: BaseException) -> None:
        """open() or accept() raised exc: the source is broken."""


class LeaderPool(WorkerPool):
    """A WorkerPool whose threads can also wait for work themselves
    (leader/follower): while ``lead(source)`` is in force, idle threads wait
    in ``source``'s accept() (without the GIL, in fastlisten's core), each
    item goes to one of them, and that thread runs it at once: no queue, no
    condition variable, no hand-off between threads per item.

    - One thread waits at all times (a thread that takes an item while no
      other waits starts another first), up to ``max_threads``: beyond it,
      nobody waits and items stay where they are (a listener's backlog);
    - a thread that waited ``idle_timeout`` seconds with nothing to do
      exits, unless it is the only one waiting;
    - the caller ends it: make every waiting accept() return, and every
      later one return at once (the source's stop), then stop_leading(),
      which does not wait for them: the waiting threads leave the source
      on their own, and exit; threads running an item finish it and exit;
      running(), busy_threads(), wait_idle(), join() see them as for
      submitted jobs; close() (e.g. at interpreter exit) interrupts the
      source's waits and the threads exit.  A later lead() may begin while
      threads of the previous source are still on their way out.
    """

    _source: Optional[Source] = None
    #: threads waiting in (or about to call) the current source's accept();
    #: those of a source that stop_leading() ended are no longer counted
    _waiting = 0
    _taken = 0          # items the threads took from the current source
    _taken_wanted = 0   # stop_leading() waits for _taken to reach it (0: nobody waits)
    _took: Optional[threading.Condition] = None     # ... on this

    def lead(self, source: Source) -> None:
        """Serve ``source``: start a thread waiting in it."""
        with self._lock:
            if self._source is not None:
                raise RuntimeError("this pool already leads a source")
            self._source = source
            self._taken = 0
            if self._took is None:
                self._took = threading.Condition(self._lock)
            spawn = self._new_follower()
        if spawn is not None:
            self._start_follower(*spawn)

    @property
    def closed(self) -> bool:
        """True once close() was called."""
        return self._closed

    def close(self) -> None:
        """Take no more jobs (see WorkerPool.close); threads waiting in the
        source are woken and exit."""
        super().close()
        with self._lock:
            if self._source is not None:
                # under the lock: stop_leading() has not run, so the
                # source's descriptors are still open
                self._source.interrupt()
            if self._took is not None:
                self._took.notify_all()     # a stop_leading() waits no more

    def stop_leading(self, taken: int = 0,
                     failed: Callable[[], bool] = lambda: False) -> None:
        """Stop serving the source, once the caller has made every waiting
        accept() return and every later one return at once without
        touching the source.  ``taken``: how many items accept() gave out
        in all (final by then): first wait until the threads have taken
        each of them in hand (then running(), wait_idle() and join() see
        them), unless ``failed()`` or the pool closes.  The threads waiting
        in the source are not waited for: they leave on their own (and are
        no longer counted as waiting)."""
        with self._lock:
            took = self._took
            try:
                if took is not None and self._taken < taken:
                    self._taken_wanted = taken
                    while self._taken < taken and not self._closed and not failed():
                        took.wait()
            finally:
                self._taken_wanted = 0
                self._source = None
                self._waiting = 0

    def _new_follower(self) -> Optional[Tuple[threading.Thread, Source]]:
        """A thread to wait in the source (and that source), if none waits
        and one may start.  Called with the lock held; counted as waiting
        from now on; start it with _start_follower() once the lock is
        released."""
        source = self._source
        if (source is None or self._closed or self._waiting
                or (self.max_threads is not None and len(self._threads) >= self.max_threads)):
            return None
        self._serial += 1
        t = threading.Thread(target=self._follow, args=(source,),
                             name=f"{self._name}-{self._serial}", daemon=self.daemon)
        self._threads.add(t)
        self._waiting += 1
        return t, source

    def _start_follower(self, t: threading.Thread, source: Source) -> None:
        try:
            self._start(t)      # (which forgets t if it cannot start)
        except BaseException:
            with self._lock:
                if self._source is source:      # (else stop_leading() forgot it)
                    self._waiting -= 1
            raise

    def _follow(self, source: Source) -> None:
        """A follower thread: wait in the source, run what it gives, wait again."""
        me = threading.current_thread()
        lock, busy = self._lock, self._busy
        waiting = True          # counted in self._waiting
        broken = False          # the source failed: no replacement either
        close: Optional[Callable[[], None]] = None
        try:
            try:
                accept, close = source.open(self.idle_timeout)
            except BaseException as exc:
                broken = True
                source.failed(exc)      # the caller sees it there
                if isinstance(exc, OSError):
                    return
                raise
            run = source.run
            acquire, release = lock.acquire, lock.release
            monotonic = time.monotonic
            idle_since = monotonic()
            while True:
                try:
                    batch = accept()
                except BaseException as exc:
                    broken = True
                    source.failed(exc)      # while counted: the source is still open
                    if isinstance(exc, OSError):
                        return
                    raise
                if not batch:
                    source.empty()
                # (acquire/release rather than "with": this runs per connection)
                acquire()
                try:
                    current = self._source is source
                    if current:     # (else stop_leading() forgot it)
                        self._waiting -= 1
                    waiting = False
                    leading = current and not self._closed
                    spawn = None
                    if batch:
                        args = batch[0]
                        busy[me] = args
                        if len(busy) > self.peak:
                            self.peak = len(busy)
                        if current:
                            self._taken += 1
                            if self._taken_wanted:
                                self._took.notify_all()   # type: ignore[union-attr]
                        if not self._waiting:
                            spawn = self._new_follower()    # someone must wait meanwhile
                    elif not leading or (self._waiting and
                                         monotonic() - idle_since >= self.idle_timeout):
                        return      # stopped, or idle while another thread waits
                    else:
                        self._waiting += 1
                        waiting = True
                        continue
                finally:
                    release()
                del batch
                if spawn is not None:
                    self._start_follower(*spawn)
                try:
                    run(*args)
                finally:
                    del args
                    acquire()
                    try:
                        del busy[me]
                        if not busy and not self._jobs:
                            self._stop_waiting = False     # idle: that stop is served
                            if self._idle_waiters:
                                self._done.notify_all()
                        leading = self._source is source and not self._closed
                        if leading:
                            self._waiting += 1
                            waiting = True
                    finally:
                        release()
                if not leading:
                    return
                idle_since = monotonic()
        finally:
            if close is not None:
                close()
            with self._lock:
                if waiting and self._source is source:
                    self._waiting -= 1
                if self._taken_wanted and self._took is not None:
                    self._took.notify_all()
                self._threads.discard(me)
                busy.pop(me, None)
                # ended by SystemExit & co.: the wait must go on (in the
                # source led now, if any)
                spawn = None if broken else self._new_follower()
                # Jobs submit() queued while this thread held the last place
                # (after stop_leading(): connections the caller accepted
                # itself) must not be stranded, nor submit() wait for ever.
                replacement = None
                if spawn is None and len(self._jobs) > self._idle:
                    replacement = self._new_thread(self._jobs.popleft())
                    self._room.notify()
            if spawn is not None:
                self._start_follower(*spawn)
            if replacement is not None:
                self._start(replacement)
