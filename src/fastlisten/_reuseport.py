"""The supervisor's ``SO_REUSEPORT`` sockets: one per worker slot, and the
classic BPF program that steers new connections to the slots whose worker
accepts (see :mod:`fastlisten.workers`)."""

from __future__ import annotations

import ctypes
import errno
import logging
import socket
import struct
import warnings
from typing import AbstractSet, Any, List, Optional, Tuple

from fastlisten import sysinfo
from fastlisten.config import ListenConfig
from fastlisten.errors import EphemeralPortWarning
from fastlisten.listener import Listener

__all__ = ["ReusePortGroup", "steering_program"]

_log = logging.getLogger("fastlisten.workers")

_SO_ATTACH_REUSEPORT_CBPF = 51
_SO_DETACH_REUSEPORT_BPF = 68


# -- the reuseport steering program -------------------------------------------

# Classic BPF opcodes (linux/filter.h) for the program below.
_BPF_LD_W_ABS = 0x00 | 0x00 | 0x20      # BPF_LD | BPF_W | BPF_ABS
_BPF_ALU_MOD_K = 0x04 | 0x90 | 0x00     # BPF_ALU | BPF_MOD | BPF_K
_BPF_JEQ_K = 0x05 | 0x10 | 0x00         # BPF_JMP | BPF_JEQ | BPF_K
_BPF_RET_K = 0x06 | 0x00                # BPF_RET | BPF_K
_SKF_AD_RANDOM = -0x1000 + 56           # SKF_AD_OFF + SKF_AD_RANDOM


def steering_program(indices: List[int]) -> List[Tuple[int, int, int, int]]:
    """A classic BPF program for ``SO_ATTACH_REUSEPORT_CBPF`` that sends
    each new connection to one of the reuseport group members at
    ``indices`` (positions in the group's socket array), uniformly at
    random: ``A = random % len(indices)`` then a jump table."""
    if not indices:
        raise ValueError("steering needs at least one socket to steer to")
    prog = [(_BPF_LD_W_ABS, 0, 0, _SKF_AD_RANDOM & 0xFFFFFFFF),
            (_BPF_ALU_MOD_K, 0, 0, len(indices))]
    for j, index in enumerate(indices[:-1]):
        prog.append((_BPF_JEQ_K, 0, 1, j))      # A == j ? next : skip the ret
        prog.append((_BPF_RET_K, 0, 0, index))
    prog.append((_BPF_RET_K, 0, 0, indices[-1]))
    return prog


def _attach_cbpf(fd: int, prog: List[Tuple[int, int, int, int]]) -> None:
    """setsockopt(SO_ATTACH_REUSEPORT_CBPF) with a struct sock_fprog."""
    filters = (ctypes.c_uint8 * (8 * len(prog)))()
    for i, insn in enumerate(prog):
        struct.pack_into("=HBBI", filters, 8 * i, *insn)
    fprog = struct.pack("=HxxxxxxQ", len(prog), ctypes.addressof(filters))
    sock = socket.socket(fileno=fd)
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_REUSEPORT_CBPF, fprog)
    finally:
        sock.detach()


def _detach_cbpf(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_DETACH_REUSEPORT_BPF, 0)
    except OSError as exc:
        if exc.errno != errno.ENOENT:     # no program attached
            raise
    finally:
        sock.detach()


# -- the group ------------------------------------------------------------------

class ReusePortGroup:
    """The ``SO_REUSEPORT`` sockets of a supervisor's worker slots, each a
    separate ``socket()`` call made with ``config`` (the first one's port
    for the others).  Slot i's socket (``None`` while it has none) and the
    kernel's model of the group: the slot of each position in its socket
    array, a closed member's place taken by the last one.

    ``handover`` says what a closing socket does with its queue: "migrate"
    (net.ipv4.tcp_migrate_req=1: the kernel moves it to a live socket) or
    "steer" (a classic BPF program first keeps new connections away, and
    the worker empties it)."""

    def __init__(self, config: ListenConfig) -> None:
        self.config = config
        self.handover: Optional[str] = None
        self._slots: List[Optional[Listener]] = []
        self._group: List[int] = []       # slot of each group array position
        self._steered: Optional[Tuple[int, ...]] = None

    def open(self, count: int) -> None:
        """Open ``count`` slots' sockets; nothing is left open if one fails."""
        migrate = sysinfo.tcp_migrate_req()
        self.handover = "migrate" if migrate == 1 else "steer"
        try:
            for _ in range(count):
                self.open_slot()
        except BaseException:
            for listener in self._slots:
                if listener is not None:
                    listener.close()
            self._slots.clear()
            self._group.clear()
            raise
        _log.info("reuse-port: %d sockets; a closing socket's queue %s", count,
                  "moves to a live socket (net.ipv4.tcp_migrate_req=1)"
                  if self.handover == "migrate" else
                  "is kept: new connections are steered away by a classic BPF program "
                  "(SO_ATTACH_REUSEPORT_CBPF) and the worker empties it before it closes "
                  f"(net.ipv4.tcp_migrate_req={migrate})")

    def __len__(self) -> int:
        """Slots, with or without a socket."""
        return len(self._slots)

    def listener(self, i: int) -> Optional[Listener]:
        """Slot i's socket (None: it has none, or there is no slot i)."""
        return self._slots[i] if i < len(self._slots) else None

    def listeners(self) -> List[Listener]:
        """The open sockets."""
        return [listener for listener in self._slots if listener is not None]

    @property
    def address(self) -> Any:
        """The first slot's bound address (None before any)."""
        first = self.listener(0)
        return None if first is None else first.address

    def fileno(self, i: int) -> int:
        listener = self._slots[i]
        assert listener is not None
        return listener.fileno()

    def other_fds(self, i: int) -> List[int]:
        """The descriptors of every socket but slot i's (a worker closes
        them, else a closed slot would live on in it)."""
        return [listener.fileno() for j, listener in enumerate(self._slots)
                if j != i and listener is not None]

    def open_slot(self) -> int:
        """Open a socket in the first slot without one; returns its slot."""
        config = self.config
        if self._slots and config.family != socket.AF_UNIX:
            first = next(s for s in self._slots if s is not None)
            config = config.replace(port=first.address[1])
            with warnings.catch_warnings():     # said once, for the first socket
                warnings.simplefilter("ignore", EphemeralPortWarning)
                listener = Listener.from_config(config)
        else:
            listener = Listener.from_config(config)
        for i, slot in enumerate(self._slots):
            if slot is None:
                self._slots[i] = listener
                break
        else:
            self._slots.append(listener)
            i = len(self._slots) - 1
        self._group.append(i)
        return i

    def open_slot_at(self, slot: int) -> None:
        """Open slot ``slot``'s socket again (one above the old worker count
        that a removal closed and an addition wants again)."""
        i = self.open_slot()
        assert i == slot, (i, slot)

    def close_slot(self, i: int) -> None:
        listener = self._slots[i]
        if listener is not None:
            listener.close()
            # The kernel fills the hole with the group's last socket.
            pos = self._group.index(i)
            self._group[pos] = self._group[-1]
            self._group.pop()
        self._slots[i] = None
        self._steered = None

    def trim(self, count: int) -> None:
        """Forget the empty slots at the end beyond ``count``."""
        while self._slots and self._slots[-1] is None and len(self._slots) > count:
            self._slots.pop()

    def close(self) -> None:
        """Close every socket."""
        for i in range(len(self._slots)):
            if self._slots[i] is not None:
                self.close_slot(i)
        self._slots.clear()

    def steer(self, accepting: AbstractSet[int]) -> None:
        """Point new connections at the slots in ``accepting`` (those whose
        worker accepts): a program for the kernel, none when every socket is
        meant (or none is)."""
        if len(self._group) < 2:
            return
        indices = tuple(i for i, slot in enumerate(self._group) if slot in accepting)
        if indices == self._steered:
            return
        fd = self.fileno(self._group[0])
        try:
            if not indices or len(indices) == len(self._group):
                _detach_cbpf(fd)
            else:
                _attach_cbpf(fd, steering_program(list(indices)))
        except OSError as exc:
            _log.warning("cannot steer reuse-port connections (%s): a closing socket may "
                         "reset the connections queued on it", exc)
        self._steered = indices
