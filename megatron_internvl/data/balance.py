"""Balanced global batches: a step's packs planned from sample metadata, then dealt to ranks.

A synchronous step is as slow as its slowest data-parallel rank, and equal token counts are not
equal compute: the ViT cost follows the tiles, attention the sum of squared sample lengths. The
planner sees only what is cheap to know without decoding pixels, a `Unit` per packable sample
(tokens after templating, tiles from the image headers, the lengths of the LLM sequences inside
it), and works in two stages:

1. **Form** the step's `G` packs (G = packs per optimizer step over all ranks, fixed by the
   config, not by the DP size) from a pool of units: the units carried over from the previous
   step plus new ones in global order until the pool holds `G + lookahead` packs' worth of
   tokens. Units carried for `FORCE_AGE` steps go first, then the rest by their cost beyond the
   per-token part (tiles, squared lengths), largest first, each into the pack with the least
   such cost that still fits both budgets (tokens, tiles): longest-processing-time list
   scheduling under two capacities, where the short text units that come last fill the packs'
   remaining tokens. What does not fit is carried to the next step. The result depends on
   (data, seed, step) only.
2. **Deal** the G packs to (DP rank, micro-batch): largest first to the rank with the smallest
   total that still has a free micro-batch. Only this stage sees the DP size, so the global batch
   of a step is the same at any DP size, and each rank decodes only its own packs.

Costs come from the project's FLOPs counter (`models/flops.py`) for the configured model: LLM
linear layers and logits per token, causal attention per squared sequence length, ViT and
projector per tile. With `balance: tokens` the cost of a unit is its token count; `balance: none`
keeps the streaming two-budget packer and deals packs round-robin (the former global batches).

A `Unit` is generic: a conversation, a piece of a split document, or any other unit a dataset
yields (an MPO preference pair is one unit of two sequences, `lengths=(chosen, rejected)`).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np

from megatron_internvl.config.schema import ModelConfig
from megatron_internvl.models.flops import StepShapes, step_flops

from .packing import TwoBudgetPacker

BALANCE_MODES = ("none", "tokens", "compute")

# A unit carried this many steps is placed before every other unit of the pool.
FORCE_AGE = 2


def lookahead_packs(packs_per_step: int, buffer_size: int) -> int:
    """Packs' worth of tokens the pool holds beyond the step's own: choice for the small units
    that fill the last room of each pack. About one step's worth (at least 8 packs, at most
    `data.pack_buffer_size` unless an eighth of the step is more), so a unit waits only a step or
    two and every step stays a sample of the whole mixture rather than of its heaviest part."""
    return max(packs_per_step // 8, min(buffer_size, max(packs_per_step, 8)))


class Unit(NamedTuple):
    """One packable unit: its key, LLM tokens, ViT tiles and the lengths of its sequences.
    A named tuple: a reader builds one per sample piece of every global batch, and a tuple is
    built several times faster than a frozen dataclass."""

    key: tuple
    tokens: int
    tiles: int
    lengths: tuple = ()

    @property
    def sequence_lengths(self) -> tuple:
        return self.lengths or (self.tokens,)


@dataclass(frozen=True)
class CostModel:
    """Estimated training FLOPs: per token + per squared sequence length + per tile."""

    per_token: float
    per_square: float = 0.0
    per_tile: float = 0.0

    @classmethod
    def tokens(cls) -> "CostModel":
        return cls(1.0)

    @classmethod
    def for_model(cls, model, trainable: Optional[dict] = None) -> "CostModel":
        """From `models.flops.step_flops`, which is linear in tiles and quadratic in lengths."""
        tr = trainable or {"vision": True, "projector": True, "language": True}
        one = step_flops(model, StepShapes([1], 0), tr)
        two = step_flops(model, StepShapes([2], 0), tr)
        per_square = (two - 2 * one) / 2
        per_tile = step_flops(model, StepShapes([], 1), tr) - step_flops(model, StepShapes([], 0), tr)
        return cls(one - per_square, per_square, per_tile)

    def of(self, u: Unit) -> float:
        sq = sum(float(n) * n for n in u.sequence_lengths)
        return self.per_token * u.tokens + self.per_square * sq + self.per_tile * u.tiles

    def of_units(self, units: Sequence[Unit]) -> float:
        return sum(self.of(u) for u in units)

    def of_columns(self, cols: "UnitColumns") -> np.ndarray:
        """`of` of every unit at once: the same float64 operations in the same order, so equal
        bit for bit."""
        return self.per_token * cols.tokens + self.per_square * cols.squares + self.per_tile * cols.tiles

    def of_packs(self, packs: Sequence[Sequence[Unit]]) -> list[float]:
        """`of_units` of every pack, bit for bit (each pack summed in its order, from 0)."""
        flat = [u for p in packs for u in p]
        return sequential_sums(self.of_columns(UnitColumns.of(flat)), [len(p) for p in packs])


@dataclass(frozen=True)
class UnitColumns:
    """The planner's numbers of a list of units as arrays: tokens, tiles, and the sum of the
    squared sequence lengths (float64, summed as `CostModel.of` does)."""

    tokens: np.ndarray
    tiles: np.ndarray
    squares: np.ndarray

    @classmethod
    def of(cls, units: Sequence[Unit]) -> "UnitColumns":
        n = len(units)
        tok = np.fromiter((u.tokens for u in units), dtype=np.int64, count=n)
        til = np.fromiter((u.tiles for u in units), dtype=np.int64, count=n)
        ftok = tok.astype(np.float64)
        sq = ftok * ftok  # one sequence of `tokens` (every unit but MPO pairs)
        for k, u in enumerate(units):
            if u.lengths and u.lengths != (u.tokens,):
                sq[k] = sum(float(m) * m for m in u.lengths)
        return cls(tok, til, sq)


def sequential_sums(values: np.ndarray, counts: Sequence[int]) -> list[float]:
    """Sums of consecutive runs of `values` (`counts[k]` values each), each added left to right
    from 0 as Python's `sum` does (numpy's own sums are pairwise: other roundings). Vectorised
    over the runs: step j adds every run's j-th value."""
    counts = np.asarray(counts, dtype=np.int64)
    starts = np.cumsum(counts) - counts
    out = np.zeros(counts.size)
    for j in range(int(counts.max()) if counts.size else 0):
        live = np.flatnonzero(counts > j)
        out[live] += values[starts[live] + j]
    return out.tolist()


def default_cost(balance: str) -> Optional[CostModel]:
    """The cost when the caller names no model: the schema's default model for `compute`."""
    if balance == "tokens":
        return CostModel.tokens()
    if balance == "compute":
        return CostModel.for_model(ModelConfig())
    return None


def form_packs(pool: "Sequence[Unit] | UnitColumns", num_packs: int, max_tokens: int, max_tiles: int,
               cost: CostModel, forced: int = 0) -> tuple[list[list[int]], list[int]]:
    """Place pool units into `num_packs` packs of near-equal cost under both budgets.

    Nearly every pack ends up full of tokens, so what must be spread evenly is the cost beyond
    the per-token part (ViT tiles, attention's squared lengths): units are placed by that
    excess, largest first, each into the pack with the smallest excess that fits both budgets;
    the small units that come last fill the packs' remaining tokens. Under `balance: tokens`
    there is no excess and units go by tokens. The first `forced` units of `pool` are placed
    first, in their order. Returns the packs (lists of pool positions) and the positions left
    over. Deterministic: ties go to the lower pack
    number / earlier position.
    """
    cols = pool if isinstance(pool, UnitColumns) else UnitColumns.of(pool)
    n = len(cols.tokens)
    G = num_packs
    tok = cols.tokens
    cst = cost.of_columns(cols)
    key = cst - cost.per_token * tok if (cost.per_square or cost.per_tile) else cst
    rest = np.arange(forced, n)
    order = np.concatenate([np.arange(forced), rest[np.argsort(-key[forced:], kind="stable")]])
    # min tokens among the units not yet considered: packs with less room are closed for good
    suffix_min = (np.minimum.accumulate(tok[order][::-1])[::-1] if n else tok).tolist()
    # The greedy placement is sequential: Python lists for the per-unit steps, numpy copies of
    # the rooms and keys for the full scan when the smallest pack does not fit.
    tok_l, til_l, key_l = tok.tolist(), cols.tiles.tolist(), key.tolist()
    pack_key, room_tok, room_til = [0.0] * G, [max_tokens] * G, [max_tiles] * G
    key_a = np.zeros(G)
    room_tok_a = np.full(G, max_tokens, dtype=np.int64)
    room_til_a = np.full(G, max_tiles, dtype=np.int64)
    packs: list[list[int]] = [[] for _ in range(G)]
    heap = [(0.0, b) for b in range(G)]
    left: list[int] = []
    for pos, i in enumerate(order.tolist()):
        t, v = tok_l[i], til_l[i]
        b = -1
        # fast path: the pack with the smallest key (lazy heap; stale or closed entries dropped)
        while heap:
            c, cand = heap[0]
            if c != pack_key[cand] or room_tok[cand] < suffix_min[pos]:
                heapq.heappop(heap)
                continue
            if room_tok[cand] >= t and room_til[cand] >= v:
                b = cand
                heapq.heappop(heap)
            break
        if b < 0:
            keys = np.where((room_tok_a >= t) & (room_til_a >= v), key_a, np.inf)
            b = int(keys.argmin())
            if keys[b] == np.inf:  # fits nowhere
                left.append(i)
                continue
        packs[b].append(i)
        pack_key[b] += key_l[i]
        room_tok[b] -= t
        room_til[b] -= v
        key_a[b], room_tok_a[b], room_til_a[b] = pack_key[b], room_tok[b], room_til[b]
        heapq.heappush(heap, (pack_key[b], b))
    return packs, sorted(left)


class StepPlanner:
    """The plan's state: units not yet placed (with their age in steps), and for `balance: none`
    the streaming packer's partial packs. `plan(read)` forms the next step's packs, pulling whole
    samples' units from `read()` (None at the end of a finite stream). Nothing here depends on
    the DP size."""

    def __init__(self, packs_per_step: int, max_tokens: int, max_tiles: int, balance: str,
                 cost: Optional[CostModel], buffer_size: int):
        if balance not in BALANCE_MODES:
            raise ValueError(f"balance={balance!r} is not one of {BALANCE_MODES}")
        self.G, self.max_tokens, self.max_tiles = packs_per_step, max_tokens, max_tiles
        self.balance, self.cost = balance, cost
        self.lookahead = lookahead_packs(packs_per_step, buffer_size)
        self.unplaced: list[list] = []      # [Unit, age]: carried units / pending pieces (none)
        self.packer = TwoBudgetPacker(max_tokens, max_tiles, buffer_size)
        self.live: dict[tuple, Unit] = {}    # units inside the packer's buffer (none)
        self.exhausted = False

    def plan(self, read: Callable[[], Optional[list]],
             read_units: Optional[Callable[[int], tuple]] = None) -> list[list[Unit]]:
        """The next step's packs in plan order; fewer than G only at the end of a finite stream.
        `read_units(n) -> (units, ended)`, where the reader has it, returns at once what calling
        `read()` until the units hold `n` more tokens would (whole samples, in order)."""
        if self.balance == "none":
            return self._stream(read)
        G = self.G
        carried = sorted(self.unplaced, key=lambda x: -x[1])   # oldest first (stable)
        pool, ages = [u for u, _ in carried], [a for _, a in carried]   # new units: age 0
        need = (G + self.lookahead) * self.max_tokens
        have = sum(u.tokens for u in pool)
        if read_units is not None and have < need and not self.exhausted:
            units, self.exhausted = read_units(need - have)
            pool += units
            have += sum(u.tokens for u in units)
        while have < need and not self.exhausted:
            units = read()
            if units is None:
                self.exhausted = True
                break
            pool += units
            have += sum(u.tokens for u in units)
        forced = len(pool) if self.exhausted else sum(1 for a in ages if a >= FORCE_AGE)
        bins, left = form_packs(pool, G, self.max_tokens, self.max_tiles, self.cost, forced)
        self.unplaced = [[pool[i], ages[i] + 1 if i < len(ages) else 1] for i in left]
        packs = [[pool[i] for i in b] for b in bins]
        return [p for p in packs if p] if self.exhausted else packs

    def _stream(self, read) -> list[list[Unit]]:
        packs: list[list[Unit]] = []
        while len(packs) < self.G:
            if self.unplaced:
                u = self.unplaced.pop(0)[0]
                self.live[u.key] = u
                keys = self.packer.add(u.key, u.tokens, u.tiles)
                if keys is not None:
                    packs.append([self.live.pop(k) for k in keys])
                continue
            units = None if self.exhausted else read()
            if units is None:
                self.exhausted = True
                flushed = self.packer.flush()
                room = self.G - len(packs)
                packs += [[self.live.pop(k) for k in keys] for keys in flushed[:room]]
                for keys in flushed[room:]:   # beyond this step: back in line
                    self.unplaced += [[self.live.pop(k), 0] for k in keys]
                break
            self.unplaced = [[u, 0] for u in units]
        return packs

    def state_dict(self) -> dict:
        return {"unplaced": [[list(u.key), age] for u, age in self.unplaced],
                "packer": self.packer.state_dict(), "exhausted": self.exhausted}

    def wanted_keys(self, state: dict) -> set:
        """Keys whose units `load_state_dict` needs (the caller rebuilds them from metadata)."""
        return {tuple(k) for k, _ in state["unplaced"]} | {
            tuple(it) for p in state["packer"]["packs"] for it in p[3]}

    def load_state_dict(self, state: dict, units: dict, saved_balance: str) -> None:
        """Restore from a state saved under `saved_balance` (any mode converts: all of them are
        units not yet placed)."""
        unplaced = [(tuple(k), int(a)) for k, a in state["unplaced"]]
        self.exhausted = bool(state["exhausted"])
        if saved_balance == "none" and self.balance == "none":
            self.packer.load_state_dict(state["packer"])
            self.live = {tuple(k): units[tuple(k)] for k in self.packer.buffered_items()}
            self.unplaced = [[units[k], a] for k, a in unplaced]
            return
        buffered = [tuple(it) for p in state["packer"]["packs"] for it in p[3]]
        self.unplaced = [[units[k], 0] for k in buffered] + [[units[k], a] for k, a in unplaced]


def deal(pack_costs: Sequence[float], dp_size: int, balanced: bool) -> list[list[int]]:
    """Pack numbers for each DP rank, in micro-batch order.

    Round-robin (pack m * dp + r is micro-batch m of rank r) when not `balanced`; otherwise
    largest pack first to the rank with the smallest total that has a free micro-batch (each rank
    gets len / dp packs, or one more while packs remain in a short final step).
    """
    G = len(pack_costs)
    if not balanced:
        return [list(range(r, G, dp_size)) for r in range(dp_size)]
    per_rank = -(-G // dp_size)
    total = [0.0] * dp_size
    ranks: list[list[int]] = [[] for _ in range(dp_size)]
    heap = [(0.0, r) for r in range(dp_size)]
    for p in sorted(range(G), key=lambda k: (-pack_costs[k], k)):
        while True:
            c, r = heapq.heappop(heap)
            if len(ranks[r]) < per_rank:
                break
        ranks[r].append(p)
        total[r] = c + pack_costs[p]
        if len(ranks[r]) < per_rank:
            heapq.heappush(heap, (total[r], r))
    return [sorted(x) for x in ranks]


def imbalance(costs: Sequence[float]) -> float:
    """max / mean of non-negative costs (1.0 is perfect balance)."""
    c = np.asarray(costs, dtype=np.float64)
    m = c.mean() if c.size else 0.0
    return float(c.max() / m) if m > 0 else 1.0
