"""Channel selection: nested low-bit channel sets for every ratio.

A ratio ``r`` is the fraction of the *eligible* layers' MACs that run in 4-bit (every input
channel of a layer carries the same MACs, so a layer's share is ``n_low * macs_per_channel``);
latency is therefore monotone in it.  Ratios are processed in ascending order and each one
starts from the previous set, only adding channels, which makes the sets nested.

Strategies (all deterministic under ``config.seed``):

``static``
    The paper's baseline: every eligible layer gets the same fraction, channels in range order
    (smallest activation x weight range first).
``random``
    Same uniform allocation, channels in a seeded random order.
``greedy``
    Channels ordered by the error proxy of :func:`bitops.error_proxy`; the ratio is allocated
    across layers by *measured* sensitivity: for each layer the output distance to the INT8
    model is measured with 1/8, 2/8, ... of its channels lowered (others INT8), and channels
    are added where the distance grows least per MAC.
``evolutionary``
    The paper's Algorithm 1 on top of greedy: an individual is one 4-bit flag per channel;
    *mutation* swaps a 4-bit and an 8-bit channel inside one layer (MACs unchanged),
    *crossover* combines layers of two parents and moves ratio between layers (a repair step
    restores the MAC budget); fitness is the distance (mean squared logit difference) between
    the mixed model and the INT8 model on the search images.  Tournament selection, elitism 2.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

@dataclass
class LayerInfo:
    name: str
    channels: int
    macs: int  # per channel
    eligible: bool
    proxy: np.ndarray  # (C,) error proxy (lower = safer to lower)
    range_score: np.ndarray  # (C,)


class Selector:
    """Builds nested channel sets; ``distance(masks)`` measures a candidate (lower = better)."""

    def __init__(self, infos: list[LayerInfo], distance, config, cache: dict | None = None
                 ) -> None:
        self.infos = [i for i in infos if i.eligible]
        self.all_infos = infos
        self.distance = distance
        self.cfg = config
        self.rng = np.random.default_rng(config.seed)
        self.total_macs = sum(i.channels * i.macs for i in self.infos)
        self.evaluations = 0
        self.steps = config.sensitivity_steps
        # sensitivity curves depend only on the model, calibration and steps: callers running
        # several selections on the same calibration share them through ``cache``
        self.cache = {} if cache is None else cache
        self.sensitivity_cached = False

    # ------------------------------------------------------------------ helpers

    def _macs(self, sets: dict[str, np.ndarray]) -> int:
        return sum(int(sets[i.name].sum()) * i.macs for i in self.infos)

    def _measure(self, sets: dict[str, np.ndarray], pin: bool = False) -> float:
        """``pin``: the distance may keep this candidate's intermediate results until the
        next pin, so that candidates near it cost less (see ``FakeQuantModel.memoize``)."""
        self.evaluations += 1
        return float(self.distance(sets, pin=pin))

    def _empty(self) -> dict[str, np.ndarray]:
        return {i.name: np.zeros(i.channels, bool) for i in self.infos}

    @staticmethod
    def _order_from_sets(chain: list[np.ndarray], key: np.ndarray) -> np.ndarray:
        """Priority order: channels of the first set, then those added by each next set, then
        the rest; inside each segment by ascending ``key``."""
        c = len(key)
        rank = np.full(c, len(chain), dtype=np.int64)
        for k in range(len(chain) - 1, -1, -1):
            rank[chain[k]] = k
        return np.lexsort((np.arange(c), key, rank)).astype(np.int32)

    # ------------------------------------------------------------------ strategies

    def run(self) -> dict[str, tuple[np.ndarray, dict[float, int]]]:
        """``{layer: (order, {ratio: n_low})}`` for every layer (ineligible: all zero)."""
        t0 = time.time()
        method = self.cfg.selection
        ratios = self.cfg.ratios
        if method in ("static", "random"):
            chains = self._uniform(ratios, random=method == "random")
        else:
            chains = self._searched(ratios, evolutionary=method == "evolutionary")
        out = {}
        for info in self.all_infos:
            if not info.eligible:
                order = np.argsort(info.proxy, kind="stable").astype(np.int32)
                out[info.name] = (order, dict.fromkeys(ratios, 0))
                continue
            key = info.range_score if method == "static" else info.proxy
            if method == "random":
                key = self._random_keys[info.name]
            sets = [chains[r][info.name] for r in ratios]
            order = self._order_from_sets(sets, key)
            out[info.name] = (order, {r: int(s.sum()) for r, s in zip(ratios, sets)})
        log.info("selection %s: %d evaluations, %.1f s", method, self.evaluations,
                 time.time() - t0)
        self.seconds = time.time() - t0
        return out

    def _uniform(self, ratios, random: bool) -> dict[float, dict[str, np.ndarray]]:
        self._random_keys = {i.name: self.rng.permutation(i.channels).astype(np.float64)
                             for i in self.infos}
        chains = {}
        for r in ratios:
            sets = {}
            for i in self.infos:
                key = self._random_keys[i.name] if random else i.range_score
                order = np.lexsort((np.arange(i.channels), key))
                m = np.zeros(i.channels, bool)
                m[order[: round(r * i.channels)]] = True
                sets[i.name] = m
            chains[r] = sets
        return chains

    def _sensitivity(self) -> dict[str, np.ndarray]:
        """Distance with 0, 1/S, ..., S/S of each layer's channels lowered (proxy order)."""
        # the curves depend on the codes too: how they were rounded and extracted
        codes = (self.cfg.reconstruct, self.cfg.reconstruct_alpha, self.cfg.extraction,
                 self.cfg.search_metric)  # and on what is measured
        key = ("sensitivity", self.steps, tuple(i.name for i in self.infos), codes)
        if key in self.cache:
            self.sensitivity_cached = True
            return self.cache[key]
        base = self._measure(self._empty(), pin=True)  # every point shares its prefix
        curves = {}
        for i in self.infos:
            order = np.argsort(i.proxy, kind="stable")
            pts = [base]
            for k in range(1, self.steps + 1):
                sets = self._empty()
                sets[i.name][order[: round(k / self.steps * i.channels)]] = True
                pts.append(self._measure(sets))
            curves[i.name] = np.maximum.accumulate(np.asarray(pts))  # lowering never helps
        self.cache[key] = curves
        return curves

    def _curve_at(self, info: LayerInfo, curve: np.ndarray, n: float) -> float:
        grid = np.round(np.arange(self.steps + 1) / self.steps * info.channels)
        return float(np.interp(n, grid, curve))

    def _greedy_fill(self, base: dict[str, np.ndarray], target: int, curves) -> dict:
        """Add channels (proxy order within a layer) where the measured curve grows least."""
        sets = {k: v.copy() for k, v in base.items()}
        cur = self._macs(sets)
        while cur < target:
            best, best_cost, best_n = None, np.inf, 0
            for i in self.infos:
                n = int(sets[i.name].sum())
                if n >= i.channels:
                    continue
                step = max(1, int(np.ceil(i.channels / self.steps)))
                step = min(step, i.channels - n)
                need = int(np.ceil((target - cur) / i.macs))
                add = min(step, need)
                cost = (self._curve_at(i, curves[i.name], n + add)
                        - self._curve_at(i, curves[i.name], n)) / (add * i.macs)
                if cost < best_cost:
                    best, best_cost, best_n = i, cost, add
            if best is None:
                break
            free = np.flatnonzero(~sets[best.name])
            pick = free[np.argsort(best.proxy[free], kind="stable")[:best_n]]
            sets[best.name][pick] = True
            cur += best_n * best.macs
        return sets

    def _searched(self, ratios, evolutionary: bool) -> dict[float, dict[str, np.ndarray]]:
        curves = self._sensitivity()
        chains: dict[float, dict[str, np.ndarray]] = {}
        prev = self._empty()
        for r in ratios:
            target = int(np.ceil(r * self.total_macs - 1e-9))
            if r >= 1.0:
                sets = {i.name: np.ones(i.channels, bool) for i in self.infos}
            elif r <= 0.0:
                sets = self._empty()
            else:
                sets = self._greedy_fill(prev, target, curves)
                if evolutionary:
                    sets = self._evolve(prev, sets, target)
            chains[r] = sets
            prev = sets
        return chains

    # ------------------------------------------------------------------ evolutionary

    def _repair(self, sets, base, target):
        """Restore ``macs >= target`` and drop surplus 4-bit channels (never base ones)."""
        cur = self._macs(sets)
        infos = self.infos
        while cur < target:
            cand = [i for i in infos if not sets[i.name].all()]
            i = cand[self.rng.integers(len(cand))]
            free = np.flatnonzero(~sets[i.name])
            c = free[np.argmin(i.proxy[free])]
            sets[i.name][c] = True
            cur += i.macs
        while True:
            cand = [i for i in infos if (sets[i.name] & ~base[i.name]).any()
                    and cur - i.macs >= target]
            if not cand:
                break
            i = cand[self.rng.integers(len(cand))]
            extra = np.flatnonzero(sets[i.name] & ~base[i.name])
            c = extra[np.argmax(i.proxy[extra])]
            sets[i.name][c] = False
            cur -= i.macs
        return sets

    def _mutate(self, sets, base):
        """Swap one 4-bit and one 8-bit channel inside a random layer (MACs unchanged)."""
        cand = [i for i in self.infos
                if (sets[i.name] & ~base[i.name]).any() and not sets[i.name].all()]
        if not cand:
            return sets
        i = cand[self.rng.integers(len(cand))]
        on = np.flatnonzero(sets[i.name] & ~base[i.name])
        off = np.flatnonzero(~sets[i.name])
        sets[i.name][on[self.rng.integers(len(on))]] = False
        sets[i.name][off[self.rng.integers(len(off))]] = True
        return sets

    def _crossover(self, a, b, base, target):
        """Per-layer uniform crossover, then move ratio from one layer to another, repair."""
        child = {i.name: (a if self.rng.random() < 0.5 else b)[i.name].copy()
                 for i in self.infos}
        donors = [i for i in self.infos if (child[i.name] & ~base[i.name]).any()]
        if donors and self.rng.random() < 0.5:
            d = donors[self.rng.integers(len(donors))]
            extra = np.flatnonzero(child[d.name] & ~base[d.name])
            k = max(1, len(extra) // 4)
            child[d.name][self.rng.choice(extra, size=k, replace=False)] = False
        return self._repair(child, base, target)

    def _evolve(self, base, seed_sets, target):
        cfg = self.cfg
        pop = [seed_sets]
        while len(pop) < cfg.population:
            ind = {k: v.copy() for k, v in seed_sets.items()}
            for _ in range(1 + self.rng.integers(4)):
                ind = self._mutate(ind, base)
            if self.rng.random() < 0.5:
                ind = self._crossover(ind, seed_sets, base, target)
            pop.append(ind)
        fit = [self._measure(p, pin=k == 0) for k, p in enumerate(pop)]
        for gen in range(cfg.generations):
            order = np.argsort(fit, kind="stable")
            new = [pop[order[0]], pop[order[1]]]
            new_fit = [fit[order[0]], fit[order[1]]]

            def tournament():
                idx = self.rng.choice(len(pop), size=3, replace=False)
                return pop[idx[np.argmin([fit[j] for j in idx])]]

            while len(new) < cfg.population:
                child = self._crossover(tournament(), tournament(), base, target)
                for _ in range(self.rng.integers(1, 3)):
                    child = self._mutate(child, base)
                new.append(child)
                new_fit.append(self._measure(child))
            pop, fit = new, new_fit
            log.debug("generation %d best %.5g", gen, min(fit))
        best = pop[int(np.argmin(fit))]
        log.info("evolutionary: greedy %.5g -> best %.5g", self._measure(seed_sets), min(fit))
        return best
