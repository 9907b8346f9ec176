"""A model of how a GPU's in-order block dispatch balances a causal prefill grid (not a measurement).

Each program's work is the number of key (or query) blocks it visits plus a fixed cost of
OVERHEAD blocks (loading its resident tile, writing its output). The GPU starts programs in grid
order (axis 0 fastest) on the first free slot (SMs x programs per SM): greedy list scheduling. The
makespan over the ideal (total work / slots) says how much of the machine idles at the tail.

Orders:
- default: grid (tiles, heads, batch): each (batch, head)'s tiles in turn; query tiles (forward,
  dQ) shortest first, key tiles (dK/dV) longest first;
- lpt: grid (heads, batch, tiles), every (batch, head)'s longest tile first, then the next longest.

    python benchmarks/results/2026-12-05-cpu-lpt/dispatch_model.py
"""

import heapq

OVERHEAD = 2.0  # blocks' worth of per-program fixed cost (a guess; the ranking does not hinge on it)
SMS = 132  # H200


def makespan(works, slots: int) -> float:
    free = [0.0] * slots
    for w in works:
        heapq.heappush(free, heapq.heappop(free) + w)
    return max(free)


def tile_works(seqlen: int, tile: int, other: int, query_tiles: bool) -> list[float]:
    """Causal, Sq = Sk: the blocks of `other` rows each tile visits, in tile order."""
    n = seqlen // tile
    visits = [-(-((i + 1) * tile) // other) for i in range(n)]  # query tile i sees keys [0, (i + 1) * tile)
    if not query_tiles:  # key tile j is seen by queries [j * tile, seqlen)
        visits = [-(-(seqlen - j * tile) // other) for j in range(n)]
    return [OVERHEAD + v for v in visits]


def orders(batch: int, heads: int, works: list[float], query_tiles: bool) -> dict:
    n = len(works)
    longest_first = list(range(n - 1, -1, -1)) if query_tiles else list(range(n))
    default = [works[t] for _ in range(batch) for _ in range(heads) for t in range(n)]
    lpt = [works[t] for t in longest_first for _ in range(batch) for _ in range(heads)]
    return {"default": default, "lpt": lpt}


def main() -> None:
    print("| kernel | case | tiles (own x streamed) | slots | default / ideal | lpt / ideal | modelled lpt gain |")
    print("|---|---|---|---|---|---|---|")
    for kernel, query_tiles, own, streamed in [("fwd", True, 128, 64), ("fwd", True, 64, 64),
                                               ("dkdv", False, 64, 64), ("dkdv", False, 128, 32),
                                               ("dq", True, 64, 64), ("dq", True, 128, 32)]:
        for heads, seqlen in [(16, 16384), (16, 4096), (32, 16384), (32, 4096)]:
            batch = 16384 // seqlen  # the sweep's cases: 16k tokens, hidden 2048 (D=128: 16 heads, D=64: 32)
            for per_sm in (1, 2):
                slots = SMS * per_sm
                by = orders(batch, heads, tile_works(seqlen, own, streamed, query_tiles), query_tiles)
                ideal = sum(by["default"]) / slots
                d, lpt = (makespan(by[k], slots) / ideal for k in ("default", "lpt"))
                print(f"| {kernel} | B{batch} H{heads} S{seqlen} | {own}x{streamed} | {slots} | {d:.3f} | {lpt:.3f} | "
                      f"{d / lpt:.3f}x |")


if __name__ == "__main__":
    main()
