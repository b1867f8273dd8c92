"""The plan governor: tightens a running update's plan under memory pressure, loosens it between updates.

Also `UpdateOutcome`, what one update did to its plan, which a training
worker sends back so the daemon's governor can pick the next start plan.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from edge_daemon.memory.pressure import Level
from edge_daemon.training.plan import TrainingPlan, tighten
from edge_daemon.control.replies import OutcomeStatus

log = logging.getLogger(__name__)

# After an update turns forward-only at critical, how long the level may stay critical while the
# worker gives its backward's memory back (the watchdog samples every 0.2 s by default) before it stops.
FORWARD_ONLY_GRACE_S = 2.0


@dataclass(frozen=True)
class UpdateOutcome:
    """What happened to the plan during one update (sent back from a training child)."""

    start_plan: TrainingPlan
    final_plan: TrainingPlan
    worst_level: Level
    stopped: bool

    def to_json(self) -> OutcomeStatus:
        return {
            "start_plan": self.start_plan.to_dict(),
            "final_plan": self.final_plan.to_dict(),
            "worst_level": self.worst_level.label,
            "stopped": self.stopped,
        }


def _at_least_as_tight(candidate: TrainingPlan, plan: TrainingPlan) -> bool:
    return (
        candidate.micro_batch <= plan.micro_batch
        and (candidate.checkpointing or not plan.checkpointing)
        and (candidate.optimizer == "adamw8bit" or plan.optimizer == "adamw")
    )


@dataclass
class PlanGovernor:
    """Turns the pressure level into plans: tighten during an update, loosen slowly between.

    Daemon side: `next_start_plan()` / `start_candidates()`, `may_start()`,
    `begin_update(plan)`, then `end_update(outcome)`. Trainer side (in the
    daemon or, pickled with a SharedLevel reader, in the training child):
    `plan_source(plan)` and `should_stop()` at every micro-batch boundary,
    then `outcome()`.

    Within an update a plan only ever tightens: each rise of the level
    applies that level's tightening once; critical stops, or with
    `forward_only_rung` turns the update forward-only first and stops only if
    critical comes again, or stays FORWARD_ONLY_GRACE_S after the switch. Between updates a
    calm update (never above normal) loosens the start plan one ladder step;
    one that needed tightening starts the next where it ended; one stopped
    for memory backs off (`retry_after_s`, doubling) and retries with the
    tightest plan.
    """

    level_reader: Callable[[], Level]
    ladder: Sequence[TrainingPlan] = ()
    retry_base_s: float = 300.0
    retry_max_s: float = 3600.0
    stop_event: Any = None  # threading.Event / multiprocessing.Event: shutdown
    clock: Callable[[], float] = time.monotonic
    forward_only_rung: bool = False
    _forward_only_at: float | None = field(default=None, init=False)
    _start_index: int = field(default=0, init=False)
    _failures: int = field(default=0, init=False)
    _retry_at: float = field(default=0.0, init=False)
    _start_plan: TrainingPlan | None = field(default=None, init=False)
    _plan: TrainingPlan | None = field(default=None, init=False)
    _acted: Level = field(default=Level.NORMAL, init=False)
    _worst: Level = field(default=Level.NORMAL, init=False)
    _stopped: bool = field(default=False, init=False)
    _history: list[tuple[Level, TrainingPlan | None]] = field(default_factory=list, init=False)

    def __getstate__(self) -> dict[str, Any]:
        # The clock (time.monotonic) pickles by name; history stays behind.
        state = dict(self.__dict__)
        state["_history"] = []
        return state

    @classmethod
    def from_config(
        cls, memory: Any, level_reader: Callable[[], Level], ladder: Sequence[TrainingPlan] = (), stop_event: Any = None, train: Any = None
    ) -> PlanGovernor:
        """Built from the `[memory]` config section (back-off times) and `[train] forward_only`."""
        rung = train is not None and train.forward_only == "auto"
        return cls(level_reader, ladder, memory.retry_after_s, memory.retry_max_s, stop_event, forward_only_rung=rung)

    # -- between updates (daemon) -------------------------------------------

    def _require_ladder(self) -> Sequence[TrainingPlan]:
        if not self.ladder:
            raise ValueError("PlanGovernor needs a ladder (plan_candidates(...)) for start plans")
        return self.ladder

    def next_start_plan(self) -> TrainingPlan:
        """The loosest plan the next update may start with."""
        return self._require_ladder()[self._start_index]

    def start_candidates(self) -> list[TrainingPlan]:
        """Ladder from `next_start_plan()` down, for `choose_start_plan`."""
        return list(self._require_ladder()[self._start_index :])

    @property
    def retry_after_s(self) -> float:
        """Seconds until an update may start again after a memory stop (0 = now)."""
        return max(0.0, self._retry_at - self.clock())

    def may_start(self) -> bool:
        return self.retry_after_s <= 0

    def begin_update(self, plan: TrainingPlan) -> None:
        self._start_plan = plan
        self._plan = plan
        self._acted = Level.NORMAL
        self._worst = Level.NORMAL
        self._stopped = False
        self._history = []
        self._forward_only_at = self.clock() if plan.forward_only else None

    def end_update(self, outcome: UpdateOutcome | None = None) -> None:
        """Record how the update went (`outcome` from the child, or this object's own)."""
        outcome = outcome or self.outcome()
        ladder = self.ladder
        if outcome.stopped:
            self._failures += 1
            delay = min(self.retry_max_s, self.retry_base_s * 2 ** (self._failures - 1))
            self._retry_at = self.clock() + delay
            if ladder:
                self._start_index = len(ladder) - 1
            log.warning(
                "update stopped for memory (worst level %s); retry in %.0f s with the tightest plan",
                outcome.worst_level.label,
                delay,
            )
        else:
            self._failures = 0
            self._retry_at = 0.0
            if ladder:
                if outcome.worst_level == Level.NORMAL:
                    self._start_index = max(0, self._start_index - 1)
                else:
                    self._start_index = max(self._start_index, self._ladder_index(outcome.final_plan))
            if ladder:
                log.info("next update starts with %s", self.next_start_plan().describe())
        self._plan = None

    def _ladder_index(self, plan: TrainingPlan) -> int:
        if plan.forward_only:
            return len(self.ladder) - 1  # tighter than any plan that trains by backward
        for index, candidate in enumerate(self.ladder):
            if _at_least_as_tight(candidate, plan):
                return index
        return len(self.ladder) - 1

    # -- during an update (trainer) ------------------------------------------

    def plan_source(self, plan: TrainingPlan) -> TrainingPlan | None:
        """The plan for the next micro-batch given the current one; None = stop now."""
        if self._plan is None:
            self.begin_update(plan)
        level = self.level_reader()
        self._worst = max(self._worst, level)
        if level >= Level.CRITICAL and self._must_stop(plan, level):
            if not self._stopped:
                log.warning("memory critical: stopping the update at this micro-batch boundary")
            self._stopped = True
            self._history.append((level, None))
            return None
        new_plan = plan
        if level > self._acted:
            new_plan = tighten(plan, level, self.forward_only_rung)
            assert new_plan is not None
            if new_plan.forward_only and not plan.forward_only:
                self._forward_only_at = self.clock()
        # Re-entering a level later (after the level fell back) acts again.
        self._acted = level
        if new_plan != plan:
            log.info("memory %s: plan %s -> %s", level.label, plan.describe(), new_plan.describe())
            self._history.append((level, new_plan))
        self._plan = new_plan
        return new_plan

    def should_stop(self) -> bool:
        """True on shutdown or at critical memory."""
        if self.stop_event is not None and self.stop_event.is_set():
            return True
        level = self.level_reader()
        if level >= Level.CRITICAL and self._must_stop(self._plan, level):
            self._worst = Level.CRITICAL
            self._stopped = True
            return True
        return False

    def _must_stop(self, plan: TrainingPlan | None, level: Level) -> bool:
        """At critical: stop, unless the forward-only rung is still to take, or was taken on this
        entry into critical less than FORWARD_ONLY_GRACE_S ago (its memory is being given back)."""
        if not self.forward_only_rung or plan is None:
            return True
        if not plan.forward_only:
            return False
        if self._acted < Level.CRITICAL or self._forward_only_at is None:
            return True  # a new entry into critical, or critical while forward-only from the start
        return self.clock() - self._forward_only_at >= FORWARD_ONLY_GRACE_S

    @property
    def current_plan(self) -> TrainingPlan | None:
        """The plan of the running update (for status), None between updates."""
        return self._plan

    @property
    def changes(self) -> list[tuple[Level, TrainingPlan | None]]:
        """(level, new plan) for every plan change of this update; None = stopped."""
        return list(self._history)

    def outcome(self) -> UpdateOutcome:
        start = self._start_plan
        assert start is not None, "outcome() before begin_update()/plan_source()"
        return UpdateOutcome(start, self._plan or start, self._worst, self._stopped)
