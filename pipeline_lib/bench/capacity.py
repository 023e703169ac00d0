"""The server's capacity rule (issue 23), on the open loop's level summaries: the rows of
reports/serve_open.csv (pipeline_lib.bench.serve_summary.OPEN_COLUMNS). A leaf: the load benchmark
and the report both use it.

Capacity: the highest arrival rate at which the p95 time to first audio is at most
CAPACITY_TTFA_P95_MS and at least CAPACITY_SMOOTH_SHARE of the requests play without a single stall
over STALL_LIMIT_S, every lower rate measured passing too (a rate that passes above one that failed
is noise, not capacity). A request refused (429) or failed plays nothing, so it counts against the
share. Expressed as real-time streams: rate x the mix's mean audio length (`offered_streams`: the
offered load in audio seconds per second, the mean number of listeners playing at once).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

CAPACITY_TTFA_P95_MS = 300.0
CAPACITY_SMOOTH_SHARE = 0.99
STALL_LIMIT_S = 0.100


def within_capacity(row: Mapping[str, Any]) -> bool:
    """The rule for one open-loop level: ttfa_p95_ms <= CAPACITY_TTFA_P95_MS and smooth_share >=
    CAPACITY_SMOOTH_SHARE (a level with no request, NaN figures, says nothing: False)."""
    ttfa, smooth = float(row["ttfa_p95_ms"]), float(row["smooth_share"])
    return ttfa <= CAPACITY_TTFA_P95_MS and smooth >= CAPACITY_SMOOTH_SHARE  # NaN compares False


def capacity(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The capacity from one server's open-loop rows (rate_per_s, offered_streams, ttfa_p95_ms,
    smooth_share). `rate_per_s` / `streams`: the highest passing rate with every lower one passing,
    None when the lowest rate fails; `bounded`: a higher rate was measured and failed (else the
    capacity is at least the highest rate measured); `first_failing_*`: the rate that bounds it; the
    rule's limits."""
    rs = sorted(rows, key=lambda r: float(r["rate_per_s"]))
    best = failed = None
    for r in rs:
        if not within_capacity(r):
            failed = r
            break
        best = r
    return {
        "rate_per_s": float(best["rate_per_s"]) if best is not None else None,
        "streams": float(best["offered_streams"]) if best is not None else None,
        "bounded": failed is not None,
        "first_failing_rate_per_s": float(failed["rate_per_s"]) if failed is not None else None,
        "first_failing_streams": float(failed["offered_streams"]) if failed is not None else None,
        "lowest_rate_per_s": float(rs[0]["rate_per_s"]) if rs else None,
        "ttfa_p95_limit_ms": CAPACITY_TTFA_P95_MS,
        "smooth_share_limit": CAPACITY_SMOOTH_SHARE,
        "stall_limit_ms": 1e3 * STALL_LIMIT_S,
    }


def describe(cap: Mapping[str, Any]) -> str:
    """One line for people from `capacity()`'s answer."""
    rule = (f"p95 time to first audio <= {cap['ttfa_p95_limit_ms']:.0f} ms and >= "
            f"{100 * cap['smooth_share_limit']:.0f}% of requests playing without a stall over "
            f"{cap['stall_limit_ms']:.0f} ms")
    if cap["lowest_rate_per_s"] is None:
        return f"capacity ({rule}): no open-loop level measured"
    if cap["rate_per_s"] is None:
        return (f"capacity ({rule}): below the lowest rate measured, {cap['lowest_rate_per_s']:.3g} requests/s "
                f"({cap['first_failing_streams']:.1f} real-time streams offered)")
    bound = (f"; {cap['first_failing_rate_per_s']:.3g} requests/s ({cap['first_failing_streams']:.1f} streams) "
             "fails the rule" if cap["bounded"] else "; every rate measured passed, so at least this")
    return f"capacity ({rule}): {cap['rate_per_s']:.3g} requests/s = {cap['streams']:.1f} real-time streams{bound}"
