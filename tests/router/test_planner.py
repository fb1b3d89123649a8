"""The planner's policy on recorded metric sequences: a step up, a step down, an oscillating
load, a worker that never becomes ready. A small fleet model applies each decision (a new
worker is ready ``startup_ticks`` later, or never) and feeds the counts back, as the control
loop does."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from router.planner import Decision, Observation, Planner, PlannerConfig, Reason, Role, RoleLoad

TICK_S = 2.0
CONFIG = PlannerConfig(
    slo_ttft_ms=1000,
    slo_itl_ms=50,
    min_prefill=1,
    max_prefill=3,
    min_decode=1,
    max_decode=3,
    interval_s=TICK_S,
    scale_up_after=2,
    scale_down_after=5,
    cooldown_s=10.0,
    placement_timeout_s=20.0,
    placement_backoff_s=60.0,
)


@dataclass
class Fleet:
    """Workers per role as the cluster would have them: decisions take effect here."""

    ready: dict[Role, int] = field(default_factory=lambda: {Role.PREFILL: 1, Role.DECODE: 1})
    starting: dict[Role, list[float]] = field(
        default_factory=lambda: {Role.PREFILL: [], Role.DECODE: []}
    )
    startup_s: float | None = 4.0  # None: a new worker never becomes ready

    def load(self, role: Role, now: float, **measured: float | None) -> RoleLoad:
        if self.startup_s is not None:
            placed = [t for t in self.starting[role] if now - t >= self.startup_s]
            self.ready[role] += len(placed)
            self.starting[role] = [t for t in self.starting[role] if t not in placed]
        starts = self.starting[role]
        return RoleLoad(
            ready=self.ready[role],
            starting=len(starts),
            oldest_start_s=min(starts) if starts else None,
            **measured,
        )

    def apply(self, decision: Decision, now: float) -> None:
        role = decision.role
        if decision.reason is Reason.PLACEMENT_TIMEOUT:
            self.starting[role].pop(0)
        elif decision.desired > decision.current:
            self.starting[role].append(now)
        else:
            self.ready[role] -= 1  # drained, then removed


def run(
    planner: Planner, fleet: Fleet, ticks: list[tuple[dict, dict]]
) -> list[tuple[float, Decision]]:
    """Feed one (prefill measures, decode measures) pair per tick; returns the decisions."""
    made = []
    for i, (prefill, decode) in enumerate(ticks):
        now = i * TICK_S
        obs = Observation(
            now, fleet.load(Role.PREFILL, now, **prefill), fleet.load(Role.DECODE, now, **decode)
        )
        for decision in planner.decide(obs):
            fleet.apply(decision, now)
            made.append((now, decision))
    return made


IDLE: dict = {}
BUSY_PREFILL = {"latency_ms": 2500.0, "queue": 12.0}
CALM_DECODE = {"latency_ms": 20.0, "kv_free_fraction": 0.8}


def test_a_prompt_burst_adds_prefill_workers_then_idle_returns_to_the_minimum() -> None:
    fleet = Fleet()
    burst = [(BUSY_PREFILL, CALM_DECODE)] * 30
    made = run(Planner(CONFIG), fleet, burst + [(IDLE, IDLE)] * 40)
    ups = [(t, d) for t, d in made if d.desired > d.current]
    assert [d.role for _, d in ups] == [Role.PREFILL, Role.PREFILL]  # 1 -> 2 -> 3 (the max)
    assert ups[0][0] == TICK_S  # second tick under pressure
    assert ups[1][0] - ups[0][0] >= CONFIG.cooldown_s
    assert {d.reason for _, d in ups} == {Reason.LATENCY}
    downs = [(t, d) for t, d in made if d.desired < d.current]
    assert [d.role for _, d in downs] == [Role.PREFILL, Role.PREFILL]
    assert all(d.reason is Reason.SLACK for _, d in downs)
    assert downs[0][0] >= 30 * TICK_S + (CONFIG.scale_down_after - 1) * TICK_S
    assert fleet.ready == {Role.PREFILL: 1, Role.DECODE: 1}


def test_long_generations_add_a_decode_worker_for_kv_pressure() -> None:
    fleet = Fleet()
    crowded = {"latency_ms": 30.0, "kv_free_fraction": 0.05, "queue": 0.0}
    relieved = {"latency_ms": 30.0, "kv_free_fraction": 0.3, "queue": 0.0}  # between the marks
    ticks = [({"latency_ms": 100.0}, crowded)] * 4 + [({"latency_ms": 100.0}, relieved)] * 30
    made = run(Planner(CONFIG), fleet, ticks)
    assert [(d.role, d.current, d.desired, d.reason) for _, d in made] == [
        (Role.DECODE, 1, 2, Reason.KV_PRESSURE)
    ]


def test_oscillating_load_between_the_marks_does_not_flap() -> None:
    fleet = Fleet(ready={Role.PREFILL: 2, Role.DECODE: 1})
    # TTFT alternates over and well under the SLO every tick: never two in a row over it.
    ticks = [
        ({"latency_ms": 1200.0 if i % 2 else 300.0, "queue": 1.0}, CALM_DECODE) for i in range(60)
    ]
    assert run(Planner(CONFIG), fleet, ticks) == []
    # Between the slack mark (500 ms) and the SLO (1000 ms): neither up nor down, ever.
    assert run(Planner(CONFIG), fleet, [({"latency_ms": 700.0}, CALM_DECODE)] * 60) == []
    # A queue that crosses the high mark every other tick: no change either.
    queues = [({"queue": 9.0 if i % 2 else 1.0}, CALM_DECODE) for i in range(60)]
    assert run(Planner(CONFIG), fleet, queues) == []


def test_a_step_down_in_decode_load_retires_one_worker_at_a_time() -> None:
    fleet = Fleet(ready={Role.PREFILL: 1, Role.DECODE: 3})
    busy = {"latency_ms": 40.0, "kv_free_fraction": 0.3, "queue": 2.0}  # between the marks
    made = run(Planner(CONFIG), fleet, [({}, busy)] * 20 + [({}, CALM_DECODE)] * 30)
    assert [(t, d.role, d.current, d.desired, d.reason) for t, d in made] == [
        (48.0, Role.DECODE, 3, 2, Reason.SLACK),  # the 5th slack tick after the step (40 s)
        (58.0, Role.DECODE, 2, 1, Reason.SLACK),  # one cooldown later
    ]


def test_ttft_over_the_slo_without_prefill_work_is_not_prefill_pressure() -> None:
    # Prompts prefilled on a busy decode worker: TTFT is high but no prompt waits on prefill.
    made = run(Planner(CONFIG), Fleet(), [({"latency_ms": 5000.0, "queue": 0.0}, {})] * 10)
    assert made == []
    made = run(Planner(CONFIG), Fleet(), [({"latency_ms": 5000.0, "queue": 1.0}, {})] * 5)
    assert [(d.role, d.reason) for _, d in made] == [(Role.PREFILL, Reason.LATENCY)]


def test_no_change_while_a_worker_of_the_role_drains() -> None:
    planner = Planner(CONFIG)
    draining = RoleLoad(ready=1, draining=1, queue=50.0, latency_ms=9000.0)
    for tick in range(10):
        obs = Observation(tick * TICK_S, draining, RoleLoad(ready=1))
        assert planner.decide(obs) == []
    # Drained: pressure must build up again (``scale_up_after`` ticks) before a change.
    busy = RoleLoad(ready=1, queue=50.0, latency_ms=9000.0)
    assert planner.decide(Observation(20.0, busy, RoleLoad(ready=1))) == []
    (decision,) = planner.decide(Observation(22.0, busy, RoleLoad(ready=1)))
    assert (decision.role, decision.desired) == (Role.PREFILL, 2)


def test_changes_respect_cooldown_and_wait_for_starting_workers() -> None:
    fleet = Fleet(startup_s=8.0)
    made = run(Planner(CONFIG), fleet, [(BUSY_PREFILL, CALM_DECODE)] * 20)
    times = [t for t, _ in made]
    assert len(times) == 2 and times[1] - times[0] >= max(CONFIG.cooldown_s, 8.0)


def test_a_worker_that_never_becomes_ready_is_given_up_and_not_retried_at_once() -> None:
    fleet = Fleet(startup_s=None)
    made = run(Planner(CONFIG), fleet, [(BUSY_PREFILL, CALM_DECODE)] * 60)  # 120 s
    assert [(t, d.reason) for t, d in made] == [
        (2.0, Reason.LATENCY),  # asked for a second prefill worker
        (24.0, Reason.PLACEMENT_TIMEOUT),  # given up after 20 s
        (84.0, Reason.LATENCY),  # tried again only after the 60 s backoff
        (106.0, Reason.PLACEMENT_TIMEOUT),  # and given up again; next backoff is 120 s
    ]
    assert fleet.ready[Role.PREFILL] == 1 and fleet.starting[Role.PREFILL] == []


def test_bounds_are_restored_first() -> None:
    fleet = Fleet(ready={Role.PREFILL: 0, Role.DECODE: 5})
    made = run(Planner(CONFIG), fleet, [(IDLE, IDLE)] * 3)
    assert {(d.role, d.reason) for _, d in made} == {
        (Role.PREFILL, Reason.BELOW_MIN),
        (Role.DECODE, Reason.ABOVE_MAX),
    }


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"min_prefill": 3, "max_prefill": 2}, "min_prefill <= max_prefill, got 3 and 2"),
        ({"min_decode": 0}, "min_decode must be at least 1, got 0"),
        ({"slo_ttft_ms": 0}, "slo_ttft_ms must be positive, got 0"),
        ({"kv_free_low": 0.6, "kv_free_high": 0.5}, "kv_free_low < kv_free_high"),
        ({"slack_fraction": 1.0}, "slack_fraction must be in"),
        ({"percentile": 0.0}, "percentile must be in \\(0, 1\\], got 0.0"),
        ({"drain_timeout_s": -1}, "drain_timeout_s must be >= 0, got -1"),
        ({"decode_queue_high": 0}, "decode_queue_high must be positive"),
    ],
)
def test_bad_config_is_refused(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PlannerConfig(**fields)
