"""Programs: the requests of one session (an agent's turns) ordered as a whole.

Pure Python. A client-tool agent sends its conversation again after each tool result; each of
those requests is a turn of one program, named by its session id (`Request.session_id`: the
client's own id, or a hash of the conversation's opening, `prefix_session_id`). The scheduler
holds an `Order` and sorts by `Order.key` wherever it picks a request: which waiting request
is admitted next, which running one gets the step's budget first, which one is preempted
(the largest key). Policies (`config.SchedulePolicy`):
- fcfs: each request by its own arrival (a follow-up turn is a new arrival, last in line);
- program-fcfs (Continuum): a program's turns keep the arrival of its first request;
- las (Autellix): the program that has received the least service so far, in tokens
  prefilled and decoded for its requests, goes first; short programs finish ahead of long
  ones. Its starvation guard: a request waiting longer than `starvation_s` goes ahead of all
  that have not waited as long, oldest program first.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from conveyor.config import SchedulePolicy
from conveyor.core.request import Request, RequestState

MAX_IDLE_PROGRAMS = 4096  # programs with no live request kept for their next turn (least recent go first)


@dataclass(slots=True)
class Program:
    """One session's share of the engine: when it arrived and the service it has received."""

    program_id: str
    arrival: int  # the arrival number of its first request
    service: int = 0  # tokens prefilled and decoded for its requests (prefix-cache hits excluded)
    num_live: int = 0  # its requests not yet finished


class Programs:
    """The programs seen, by id: every live request's, plus a bounded number of idle ones."""

    def __init__(self, max_idle: int = MAX_IDLE_PROGRAMS) -> None:
        self.max_idle = max_idle
        self._programs: OrderedDict[str, Program] = OrderedDict()
        self._num_idle = 0

    def __len__(self) -> int:
        return len(self._programs)

    def of(self, request: Request) -> Program:
        """The request's program (one of its own when it has no session id)."""
        program = self._programs.get(_program_id(request))
        return program if program is not None else Program(_program_id(request), request.arrival)

    def join(self, request: Request) -> Program:
        """A request of the program starts (a new turn, or the first)."""
        pid = _program_id(request)
        program = self._programs.get(pid)
        if program is None:
            program = self._programs[pid] = Program(pid, request.arrival)
        elif program.num_live == 0:
            self._num_idle -= 1
        program.num_live += 1
        self._programs.move_to_end(pid)
        return program

    def leave(self, request: Request) -> None:
        """A request of the program is finished: the program waits idle for its next turn."""
        program = self._programs.get(_program_id(request))
        if program is None or program.num_live == 0:
            return
        program.num_live -= 1
        if program.num_live == 0:
            self._num_idle += 1
            self._evict()

    def _evict(self) -> None:
        for pid in list(self._programs):
            if self._num_idle <= self.max_idle:
                return
            if self._programs[pid].num_live == 0:
                del self._programs[pid]
                self._num_idle -= 1


def _program_id(request: Request) -> str:
    return request.session_id or f"request:{request.request_id}"


class Order:
    """The scheduler's order of requests by its policy: `key(request)` sorts ascending (first
    served first), over the programs it tracks (`join` / `charge` / `leave` from the scheduler)."""

    def __init__(
        self,
        policy: str = SchedulePolicy.FCFS,
        starvation_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        max_idle: int = MAX_IDLE_PROGRAMS,
    ) -> None:
        self.policy = SchedulePolicy(policy)
        self.starvation_s = starvation_s
        self.clock = clock
        self.programs = Programs(max_idle)
        self._key = {
            SchedulePolicy.FCFS: self._fcfs,
            SchedulePolicy.PROGRAM_FCFS: self._program_fcfs,
            SchedulePolicy.LAS: self._las,
        }[self.policy]

    def join(self, request: Request) -> None:
        self.programs.join(request)

    def leave(self, request: Request) -> None:
        self.programs.leave(request)

    def charge(self, request: Request, num_tokens: int) -> None:
        """``num_tokens`` were prefilled or decoded for the request: its program's service."""
        self.programs.of(request).service += num_tokens

    def key(self, request: Request) -> tuple:
        return self._key(request)

    def _fcfs(self, request: Request) -> tuple:
        return (request.arrival,)

    def _program_fcfs(self, request: Request) -> tuple:
        return (self.programs.of(request).arrival, request.arrival)

    def _las(self, request: Request) -> tuple:
        program = self.programs.of(request)
        waited_s = self.clock() - request.queued_at_s
        if request.state is RequestState.WAITING and waited_s > self.starvation_s:
            return (0, program.arrival, request.arrival)  # starved: ahead of every fresh program
        return (1, program.service, program.arrival, request.arrival)


def prefix_session_id(messages: list[dict[str, Any]]) -> str | None:
    """A session id for a conversation whose client named none: a hash of its opening (the
    messages up to and including the first user message), which every turn of it repeats.
    None where there is no user message."""
    for i, message in enumerate(messages):
        if message.get("role") == "user":
            opening = json.dumps(messages[: i + 1], sort_keys=True, ensure_ascii=False, default=str)
            return "prefix:" + hashlib.sha256(opening.encode()).hexdigest()[:32]
    return None
