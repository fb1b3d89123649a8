"""The planner's policy: how many prefill and decode workers to run, from what the router sees.

Pure Python, no clock of its own and no I/O: the control loop hands it one ``Observation``
per tick (time, and per role the workers ready and starting, the queue, the window's latency
percentile against the SLO, the decode workers' free KV) and applies the ``Decision``s it
returns. Each role is decided on its own:

- **up** by one worker when the role is under pressure for ``scale_up_after`` ticks in a row:
  its latency percentile over the SLO (TTFT for prefill, ITL for decode), its queue per
  ready worker over the high mark, or (decode) free KV under ``kv_free_low``;
- **down** by one when it has been slack for ``scale_down_after`` ticks in a row: latency
  under ``slack_fraction`` of the SLO (or no traffic), an empty queue, and (decode) free KV
  over ``kv_free_high``; the loop drains the worker before removing it;
- never while a worker of that role is still starting or draining (the last change's effect
  is not visible yet), and never within ``cooldown_s`` of the role's last change; always
  within the bounds, and at once back into them if the worker count left them;
- TTFT over the SLO is prefill pressure only while prompts wait or run on prefill workers:
  a TTFT spent queueing on a busy decode worker (local prefill) is not cured by more
  prefill workers;
- a worker that has not become ready within ``placement_timeout_s`` is given up (the loop
  removes the pending actor and reports it), and the role does not grow again for
  ``placement_backoff_s``, doubled after each failure in a row: a cluster that cannot place
  a worker (no node offers the role's resources) is not asked forever.

Up needs fewer ticks than down (asymmetric hysteresis): a missed SLO costs more than an idle
worker; the thresholds for up and down are apart, so a load between them changes nothing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Role(str, enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


class Reason(str, enum.Enum):
    LATENCY = "latency_over_slo"
    QUEUE = "queue_over_high_mark"
    KV_PRESSURE = "kv_free_under_low_mark"
    SLACK = "slack"
    BELOW_MIN = "below_min"
    ABOVE_MAX = "above_max"
    PLACEMENT_TIMEOUT = "placement_timeout"


@dataclass(frozen=True)
class PlannerConfig:
    """``--planner`` and its targets and bounds (CLI flags of the same names)."""

    slo_ttft_ms: float = 2000.0
    slo_itl_ms: float = 100.0
    min_prefill: int = 1
    max_prefill: int = 4
    min_decode: int = 1
    max_decode: int = 4
    interval_s: float = 2.0  # one decision per interval
    window_s: float = 20.0  # the latency percentiles' window
    percentile: float = 0.9  # of TTFT and ITL over the window, against the SLOs
    scale_up_after: int = 2  # ticks in a row under pressure
    scale_down_after: int = 10  # ticks in a row slack
    cooldown_s: float = 20.0  # after a change of a role, before its next
    slack_fraction: float = 0.5  # latency under this fraction of the SLO is slack
    prefill_queue_high: float = 4.0  # waiting prompts per ready prefill worker
    decode_queue_high: float = 8.0  # waiting requests per ready decode worker
    kv_free_low: float = 0.1
    kv_free_high: float = 0.5
    placement_timeout_s: float = 120.0
    placement_backoff_s: float = 600.0  # no growth of a role after a placement timeout
    drain_timeout_s: float = 120.0  # a retired worker's requests may finish; then it is killed

    def __post_init__(self) -> None:
        positive = ("slo_ttft_ms", "slo_itl_ms", "interval_s", "window_s", "placement_timeout_s")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("cooldown_s", "placement_backoff_s", "drain_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.percentile <= 1:
            raise ValueError(f"percentile must be in (0, 1], got {self.percentile}")
        if self.prefill_queue_high <= 0 or self.decode_queue_high <= 0:
            raise ValueError(
                "prefill_queue_high and decode_queue_high must be positive, got "
                f"{self.prefill_queue_high} and {self.decode_queue_high}"
            )
        for role in Role:
            low, high = self.bounds(role)
            if not 0 <= low <= high:
                raise ValueError(
                    f"need 0 <= min_{role.value} <= max_{role.value}, got {low} and {high}"
                )
        if self.min_decode < 1:
            raise ValueError(f"min_decode must be at least 1, got {self.min_decode}")
        if self.scale_up_after < 1 or self.scale_down_after < 1:
            raise ValueError(
                "scale_up_after and scale_down_after must be at least 1, got "
                f"{self.scale_up_after} and {self.scale_down_after}"
            )
        if not 0 < self.slack_fraction < 1:
            raise ValueError(f"slack_fraction must be in (0, 1), got {self.slack_fraction}")
        if not 0 <= self.kv_free_low < self.kv_free_high <= 1:
            raise ValueError(
                f"need 0 <= kv_free_low < kv_free_high <= 1, got {self.kv_free_low} and "
                f"{self.kv_free_high}"
            )

    def bounds(self, role: Role) -> tuple[int, int]:
        if role is Role.PREFILL:
            return self.min_prefill, self.max_prefill
        return self.min_decode, self.max_decode

    def slo_ms(self, role: Role) -> float:
        return self.slo_ttft_ms if role is Role.PREFILL else self.slo_itl_ms

    def queue_high(self, role: Role) -> float:
        return self.prefill_queue_high if role is Role.PREFILL else self.decode_queue_high


@dataclass(frozen=True)
class RoleLoad:
    """One role as the router measured it at one tick."""

    ready: int  # workers serving (draining ones excluded)
    starting: int = 0  # asked for and not ready yet
    draining: int = 0  # retired: finishing their requests, then removed
    oldest_start_s: float | None = None  # when the longest-starting one was asked for
    queue: float = 0.0  # waiting requests over the role's ready workers
    latency_ms: float | None = None  # window percentile (TTFT or ITL); None: no samples
    kv_free_fraction: float | None = None  # decode: free KV blocks over all its workers' total


@dataclass(frozen=True)
class Observation:
    time: float  # seconds, any monotonic origin
    prefill: RoleLoad
    decode: RoleLoad

    def of(self, role: Role) -> RoleLoad:
        return self.prefill if role is Role.PREFILL else self.decode


@dataclass(frozen=True)
class Decision:
    """Run ``desired`` workers of ``role`` (one more or one fewer than ``current``), or, with
    ``PLACEMENT_TIMEOUT``, give up the worker that is still starting."""

    role: Role
    current: int
    desired: int
    reason: Reason


@dataclass
class _RoleState:
    up_streak: int = 0
    down_streak: int = 0
    last_change: float | None = None
    placement_failures: int = 0  # in a row
    placed_target: int | None = None  # ready workers once the last growth is placed
    no_growth_until: float = float("-inf")


@dataclass
class Planner:
    config: PlannerConfig
    _state: dict[Role, _RoleState] = field(
        default_factory=lambda: {role: _RoleState() for role in Role}
    )

    def decide(
        self, observation: Observation, roles: tuple[Role, ...] = tuple(Role)
    ) -> list[Decision]:
        """The changes to make now (none most ticks), one per role at most."""
        decisions = [self._decide(role, observation) for role in roles]
        return [d for d in decisions if d is not None]

    def _decide(self, role: Role, obs: Observation) -> Decision | None:
        load, state, config = obs.of(role), self._state[role], self.config
        low, high = config.bounds(role)
        current = load.ready + load.starting
        if load.starting:
            state.up_streak = state.down_streak = 0
            assert load.oldest_start_s is not None, "starting workers need oldest_start_s"
            if obs.time - load.oldest_start_s > config.placement_timeout_s:
                backoff = config.placement_backoff_s * 2**state.placement_failures
                state.placement_failures += 1
                state.no_growth_until = obs.time + backoff
                return self._change(
                    role, state, obs, current, current - 1, Reason.PLACEMENT_TIMEOUT
                )
            return None
        if load.draining:
            state.up_streak = state.down_streak = 0
            return None
        if state.placed_target is not None and load.ready >= state.placed_target:
            state.placement_failures, state.placed_target = 0, None  # the last growth placed
        if current < low and obs.time >= state.no_growth_until:
            return self._change(role, state, obs, current, current + 1, Reason.BELOW_MIN)
        if current > high:
            return self._change(role, state, obs, current, current - 1, Reason.ABOVE_MAX)
        pressure = self._pressure(role, load)
        state.up_streak = state.up_streak + 1 if pressure else 0
        state.down_streak = state.down_streak + 1 if self._slack(role, load) else 0
        if state.last_change is not None and obs.time - state.last_change < config.cooldown_s:
            return None
        can_grow = current < high and obs.time >= state.no_growth_until
        if pressure and state.up_streak >= config.scale_up_after and can_grow:
            return self._change(role, state, obs, current, current + 1, pressure)
        if state.down_streak >= config.scale_down_after and current > low:
            return self._change(role, state, obs, current, current - 1, Reason.SLACK)
        return None

    def _pressure(self, role: Role, load: RoleLoad) -> Reason | None:
        config = self.config
        over_slo = load.latency_ms is not None and load.latency_ms > config.slo_ms(role)
        if over_slo and (role is Role.DECODE or load.queue > 0):
            return Reason.LATENCY
        if load.queue > config.queue_high(role) * max(load.ready, 1):
            return Reason.QUEUE
        if load.kv_free_fraction is not None and load.kv_free_fraction < config.kv_free_low:
            return Reason.KV_PRESSURE
        return None

    def _slack(self, role: Role, load: RoleLoad) -> bool:
        config = self.config
        latency_slack = (
            load.latency_ms is None or load.latency_ms < config.slack_fraction * config.slo_ms(role)
        )
        kv_slack = load.kv_free_fraction is None or load.kv_free_fraction > config.kv_free_high
        return latency_slack and load.queue == 0 and kv_slack

    @staticmethod
    def _change(
        role: Role, state: _RoleState, obs: Observation, current: int, desired: int, reason: Reason
    ) -> Decision:
        state.up_streak = state.down_streak = 0
        state.last_change = obs.time
        if desired > current:
            state.placed_target = desired
        return Decision(role, current, desired, reason)
