"""Autoscaler: the shape of a round's aggregation tree, as a pure policy.

``decide(ctx, state) -> (shape, state)`` in the Ray Serve style: everything it looks
at comes in through ``ctx`` (including the clock), everything it remembers goes out
in the returned state, and the caller threads that state into the next call.

The model behind the decision (measured quantities come from the previous round):

- A leaf aggregator serves one update in ``service_s`` seconds. A tree *keeps up*
  when the work still queued at its leaves when the last update lands is small (at
  most ``backlog_allowance_s``, by default one partial merge: beyond that a second
  leaf and a merge finish sooner). Given last round's arrival times
  (``arrival_offsets``), that is measured by replaying them against ``L`` leaves
  (``simulate_leaves``): a burst that drains before the round's sparse tail needs no
  extra leaf. Without a trace, the rule is utilization at the peak rate:
  ``rho = arrival_rate * service_s / L <= target_utilization``. ``max_queued``
  optionally caps the updates waiting at once (they hold memory).
- Every update costs ``service_s`` no matter the tree; what a tree adds is one partial
  merge (``merge_s``) per non-root aggregator and one cold start (``cold_start_s``)
  per aggregator that is not warm. So the fewest function-seconds come from the
  fewest aggregators that keep up, made of warm ones where possible.
- Leaves beyond the available cores add no throughput, so ``L <= cores``.
- A parent merges at most ``fan_in`` partials; the root is reached after
  ``levels - 1`` merges. Larger fan-in means fewer middles (fewer merges, cheaper);
  ``tail_budget_s`` bounds the work after the last arrival, which grows with fan-in
  when children finish together.

Scaling down waits until the smaller tree keeps up with a margin
(``scale_down_margin`` times the bar): rates measured round to round are noisy, and
flapping between shapes would throw warm aggregators away.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field, replace

from strato.errors import ConfigError

__all__ = [
    "SHARD_OVERHEAD_MB",
    "SHARD_SCRATCH_MB",
    "AutoscalerContext",
    "AutoscalerState",
    "Estimate",
    "TreeShape",
    "aggregator_names",
    "choose_shards",
    "decide",
    "estimate",
    "levels_for",
    "record_used",
    "simulate_leaves",
]


@dataclass(frozen=True)
class TreeShape:
    """Leaves, the most children any parent has, and the number of levels.

    One leaf is a one-level tree: that leaf is also the root. Otherwise
    ``levels = 1 + ceil(log_fan_in(leaves))``.
    """

    leaves: int
    fan_in: int
    levels: int

    def __post_init__(self) -> None:
        if self.leaves < 1 or self.fan_in < (1 if self.leaves == 1 else 2):
            raise ConfigError(f"a tree needs ≥ 1 leaf and fan-in ≥ 2, got {self}")
        if self.levels != levels_for(self.leaves, self.fan_in):
            raise ConfigError(
                f"{self.leaves} leaves with fan-in {self.fan_in} make "
                f"{levels_for(self.leaves, self.fan_in)} levels, not {self.levels}"
            )

    @classmethod
    def of(cls, leaves: int, fan_in: int = 8) -> TreeShape:
        """The canonical shape: a fan-in above the leaf count is the flat tree's."""
        fan_in = 1 if leaves == 1 else max(2, min(fan_in, leaves))
        return cls(leaves, fan_in, levels_for(leaves, fan_in))

    def level_sizes(self) -> list[int]:
        """Aggregators per level, leaves first, root last."""
        sizes = [self.leaves]
        while sizes[-1] > 1:
            sizes.append(-(-sizes[-1] // self.fan_in))
        return sizes

    @property
    def aggregators(self) -> int:
        return sum(self.level_sizes())

    def to_dict(self) -> dict[str, int]:
        return {"leaves": self.leaves, "fan_in": self.fan_in, "levels": self.levels}


def levels_for(leaves: int, fan_in: int) -> int:
    if leaves > 1 and fan_in < 2:
        raise ConfigError(f"{leaves} leaves need a fan-in ≥ 2, got {fan_in}")
    levels, width = 1, leaves
    while width > 1:
        width = -(-width // fan_in)
        levels += 1
    return levels


def aggregator_names(shape: TreeShape) -> list[str]:
    """Stable names of a shape's aggregators, leaves first: ``leaf0..``, ``mid1.0..``, ``top``.

    Names are what makes warm reuse work: the same name on the same node is the same
    warm function, so two shapes share the warm aggregators whose names they share.
    A one-leaf tree's only aggregator is ``leaf0`` (it is its own root).
    """
    sizes = shape.level_sizes()
    names = [f"leaf{i}" for i in range(sizes[0])]
    for level, size in enumerate(sizes[1:], start=1):
        if level == len(sizes) - 1:
            names.append("top")
        else:
            names.extend(f"mid{level}.{i}" for i in range(size))
    return names


@dataclass(frozen=True)
class AutoscalerContext:
    expected_updates: int
    arrival_rate: float  # updates per second at the recent peak
    service_s: float  # seconds one aggregator spends per update (measured)
    update_bytes: int
    cores: float  # cores available to aggregators
    now: float  # the clock, in seconds
    merge_s: float | None = None  # seconds to merge one partial; default service_s
    cold_start_s: float = 0.5
    keep_alive_s: float = 60.0
    target_utilization: float = 0.7
    scale_down_margin: float = 0.8
    max_fan_in: int = 8
    tail_budget_s: float | None = None  # work allowed after the last arrival
    # The arrival times seen last round (any origin). When given, "keeps up" is judged
    # on this very pattern: how much work is still queued when the last update lands.
    arrival_offsets: tuple[float, ...] = ()
    backlog_allowance_s: float | None = None  # queued work allowed then; default merge_s
    max_queued: int | None = None  # updates allowed to wait at once (memory); None: any

    def __post_init__(self) -> None:
        problems = [
            (self.expected_updates < 0, "expected_updates must be ≥ 0"),
            (self.arrival_rate < 0, "arrival_rate must be ≥ 0"),
            (self.service_s < 0, "service_s must be ≥ 0"),
            (self.cores <= 0, "cores must be positive"),
            (not 0 < self.target_utilization <= 1, "target_utilization must be in (0, 1]"),
            (not 0 < self.scale_down_margin <= 1, "scale_down_margin must be in (0, 1]"),
            (self.max_fan_in < 2, "max_fan_in must be ≥ 2"),
        ]
        for bad, message in problems:
            if bad:
                raise ConfigError(f"autoscaler context: {message}")

    @property
    def merge_seconds(self) -> float:
        return self.service_s if self.merge_s is None else self.merge_s

    @property
    def allowance_s(self) -> float:
        if self.backlog_allowance_s is not None:
            return self.backlog_allowance_s
        return self.merge_seconds


def simulate_leaves(
    arrivals: tuple[float, ...] | list[float], leaves: int, service_s: float
) -> tuple[float, int]:
    """Replay arrivals against ``leaves`` servers taking ``service_s`` per update, each
    update to the leaf free first (what the dispatcher does). Returns the work still
    queued when the last update lands (beyond that update's own) and the most updates
    ever waiting at once."""
    times = sorted(arrivals)
    if not times:
        return 0.0, 0
    free = [times[0]] * leaves
    starts: list[float] = []
    waiting_max = 0
    started = 0
    for i, t in enumerate(times):
        begin = max(t, heapq.heappop(free))
        heapq.heappush(free, begin + service_s)
        starts.append(begin)  # non-decreasing: arrivals are sorted, free times only grow
        while started < len(starts) and starts[started] <= t:
            started += 1
        waiting_max = max(waiting_max, i + 1 - started)
    done = max(free)
    return max(0.0, done - times[-1] - service_s), waiting_max


@dataclass(frozen=True)
class AutoscalerState:
    """What the policy remembers: the warm aggregators (name, last used) and the last shape."""

    warm: tuple[tuple[str, float], ...] = ()
    previous: TreeShape | None = None
    decisions: int = 0

    def warm_names(self, now: float, keep_alive_s: float) -> set[str]:
        return {name for name, used in self.warm if now - used <= keep_alive_s}


@dataclass(frozen=True)
class Estimate:
    utilization: float  # per-leaf busy fraction
    keeps_up: bool
    function_s: float  # updates + merges + cold starts
    tail_s: float  # work after the last arrival
    cold_starts: int
    names: tuple[str, ...] = field(default=())


def estimate(shape: TreeShape, ctx: AutoscalerContext, warm: set[str]) -> Estimate:
    """The model's prediction for one shape (used by ``decide`` and by tests)."""
    rho = ctx.arrival_rate * ctx.service_s / shape.leaves
    names = tuple(aggregator_names(shape))
    cold = sum(1 for n in names if n not in warm)
    merges = shape.aggregators - 1
    function_s = (
        ctx.expected_updates * ctx.service_s + merges * ctx.merge_seconds + cold * ctx.cold_start_s
    )
    # After the last arrival: the last update, then in the worst case each level's
    # parent merges all its children's partials (they finish together).
    tail = ctx.service_s + (shape.levels - 1) * shape.fan_in * ctx.merge_seconds
    if ctx.arrival_offsets:
        backlog, queued = simulate_leaves(ctx.arrival_offsets, shape.leaves, ctx.service_s)
        keeps_up = backlog <= ctx.allowance_s and (
            ctx.max_queued is None or queued <= ctx.max_queued
        )
        tail += backlog
    else:
        keeps_up = rho <= ctx.target_utilization
        if rho > 1.0:
            # A backlog grows for the whole round: the fraction 1 - 1/rho of the updates
            # is still queued when the last one lands, spread over the leaves.
            backlog = ctx.expected_updates * (1.0 - 1.0 / rho) / shape.leaves
            tail += backlog * ctx.service_s
    return Estimate(rho, keeps_up, function_s, tail, cold, names)


def _leaves_needed(ctx: AutoscalerContext, utilization: float) -> int:
    work = ctx.arrival_rate * ctx.service_s  # cores' worth of aggregation
    return max(1, math.ceil(work / utilization - 1e-9))


def _first_keeping_up(ctx: AutoscalerContext, cap: int, strictness: float) -> int:
    """The fewest leaves (≤ cap) that keep up; ``strictness`` < 1 tightens the bar."""
    if not ctx.arrival_offsets:
        return _leaves_needed(ctx, ctx.target_utilization * strictness)
    for leaves in range(1, cap + 1):
        backlog, queued = simulate_leaves(ctx.arrival_offsets, leaves, ctx.service_s)
        limit = None if ctx.max_queued is None else ctx.max_queued * strictness
        if backlog <= ctx.allowance_s * strictness and (limit is None or queued <= limit):
            return leaves
    return cap


def _choose_leaves(ctx: AutoscalerContext, previous: TreeShape | None) -> int:
    cap = max(1, min(math.floor(ctx.cores + 1e-9), max(1, ctx.expected_updates)))
    up = _first_keeping_up(ctx, cap, 1.0)
    if previous is None or previous.leaves < up:
        leaves = up  # first round, or falling behind: grow now
    else:
        down = _first_keeping_up(ctx, cap, ctx.scale_down_margin)
        # clearly over-provisioned: shrink, keeping the margin; else keep the warm tree
        leaves = down if previous.leaves > down else previous.leaves
    return max(1, min(leaves, cap))


def _choose_fan_in(leaves: int, ctx: AutoscalerContext, warm: set[str]) -> TreeShape:
    if leaves == 1:
        return TreeShape.of(1)
    shapes = sorted({TreeShape.of(leaves, f) for f in range(2, ctx.max_fan_in + 1)},
                    key=lambda s: s.fan_in)
    estimates = {s: estimate(s, ctx, warm) for s in shapes}
    budget = ctx.tail_budget_s
    within = [s for s in shapes if budget is None or estimates[s].tail_s <= budget]
    if not within:  # nothing meets the budget: the smallest tail wins
        return min(shapes, key=lambda s: (estimates[s].tail_s, estimates[s].function_s))
    return min(within, key=lambda s: (estimates[s].function_s, -s.fan_in))


def decide(ctx: AutoscalerContext, state: AutoscalerState) -> tuple[TreeShape, AutoscalerState]:
    """The tree for this round, and the state to pass to the next call."""
    warm = state.warm_names(ctx.now, ctx.keep_alive_s)
    leaves = _choose_leaves(ctx, state.previous)
    shape = _choose_fan_in(leaves, ctx, warm)
    if state.previous is not None and state.previous.leaves == shape.leaves:
        # Same leaf count: keep last round's fan-in unless the new one is strictly cheaper,
        # so the middles (and their warm functions) carry over.
        kept = state.previous
        if estimate(kept, ctx, warm).function_s <= estimate(shape, ctx, warm).function_s and (
            ctx.tail_budget_s is None or estimate(kept, ctx, warm).tail_s <= ctx.tail_budget_s
        ):
            shape = kept
    return shape, record_used(replace(state, previous=shape), aggregator_names(shape), ctx)


def record_used(
    state: AutoscalerState, names: list[str], ctx: AutoscalerContext
) -> AutoscalerState:
    """Mark ``names`` used at ``ctx.now``; forget aggregators idle past keep-alive."""
    used = {name: t for name, t in state.warm if ctx.now - t <= ctx.keep_alive_s}
    for name in names:
        used[name] = ctx.now
    warm = tuple(sorted(used.items()))
    return replace(state, warm=warm, decisions=state.decisions + 1)


# A shard aggregator's fixed memory: a runtime worker that imported numpy and the shard
# handler sits at ~35 MiB here (VmHWM, measured); after a small round ~38 MiB, ~41 MiB
# with Krum (BLAS's buffers for the Gram matrices). 64 MiB covers it with malloc slack.
SHARD_OVERHEAD_MB = 64
# The reduction's working memory: a shard reduces its slice in column chunks sized so
# that the chunk's copies (median: a transposed float32 copy; trimmed mean and Krum:
# float64 copies) stay under this, whatever the slice. See ``aggregation.sharded``.
SHARD_SCRATCH_MB = 16


def choose_shards(
    updates: int,
    update_bytes: int,
    function_memory_mb: int,
    *,
    overhead_mb: int = SHARD_OVERHEAD_MB,
    scratch_mb: int = SHARD_SCRATCH_MB,
) -> int:
    """The fewest coordinate shards ``M`` whose aggregator fits in ``function_memory_mb``.

    A shard owns ``ceil(n / M)`` of the model's ``n = update_bytes / 4`` float32
    coordinates and holds ``updates`` rows of them (the round's ``K`` updates for the
    median, trimmed mean and Krum; a float64 running sum counts as 2 rows). Its peak is

        overhead_mb + scratch + (updates + 1) × 4 × ceil(n / M)   bytes (MiB = 2**20)

    where the one extra row is the slice being read (an arriving update's pages, or the
    output's, before they are dropped from the process) and the scratch is the larger
    of ``scratch_mb`` and one column's float64 copies (``16 × (updates + 1)`` bytes).
    ConfigError when not even one coordinate per shard fits.
    """
    if updates < 1:
        raise ConfigError(f"choose_shards: updates must be ≥ 1, got {updates}")
    if update_bytes < 4:
        raise ConfigError(f"choose_shards: an update of {update_bytes} bytes has no float32")
    if function_memory_mb < 1 or overhead_mb < 0 or scratch_mb < 0:
        raise ConfigError(
            f"choose_shards: function_memory_mb must be ≥ 1 and overhead_mb, scratch_mb "
            f"≥ 0, got {function_memory_mb}, {overhead_mb}, {scratch_mb}"
        )
    coordinates = -(-update_bytes // 4)
    row_bytes = 4 * (updates + 1)  # one coordinate of every row held, plus the one read
    scratch = max(scratch_mb << 20, 16 * (updates + 1))
    budget = (function_memory_mb << 20) - (overhead_mb << 20) - scratch
    max_columns = budget // row_bytes if budget > 0 else 0
    if max_columns < 1:
        need = ((overhead_mb << 20) + scratch + row_bytes) / (1 << 20)
        raise ConfigError(
            f"a shard aggregator needs {need:.1f} MiB even for one coordinate of {updates} "
            f"updates ({overhead_mb} MiB process, {scratch / (1 << 20):.1f} MiB scratch), "
            f"over function_memory_mb={function_memory_mb}: raise the function memory or "
            "take fewer updates per round"
        )
    return max(1, -(-coordinates // max_columns))
