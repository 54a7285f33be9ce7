"""The results chart: one PNG (matplotlib, Agg backend) from the benchmarks' JSON, as
``benchmarks/run.py`` loads it: bars of events/s per contender for enqueue, end to end,
backlog replay vs the raw limit and the 50 ms round trip; events lost to a SIGKILL; the
fleet's requests/s through the outage. Panels whose data is missing are left out.
"""

from __future__ import annotations

from typing import Any, Callable

from benchmarks.common import spread, values

Panel = Callable[[Any, dict[str, Any]], None]


def _bars(ax: Any, title: str, items: list[tuple[str, list[float], str]], unit: str,
          target: tuple[float, str] | None = None) -> None:
    """Horizontal bars at the median with min–max whiskers, the value written beside."""
    names = [name for name, _, _ in items]
    stats = [spread(values) for _, values, _ in items]
    medians = [s["median"] for s in stats]
    errors = [[m - s["min"] for m, s in zip(medians, stats)],
              [s["max"] - m for m, s in zip(medians, stats)]]
    ys = list(range(len(items)))[::-1]
    ax.barh(ys, medians, xerr=errors, color=[color for _, _, color in items], capsize=3,
            alpha=0.85)
    ax.set_yticks(ys, names, fontsize=8)
    for y, m, hi in zip(ys, medians, errors[1]):  # the label clears the whisker
        ax.text(m + hi, y, f"  {m:,.0f}" if m >= 10 else f"  {m:.2g}", va="center", fontsize=7)
    right = max(m + e for m, e in zip(medians, errors[1]))
    if target:
        right = max(right, target[0])
        ax.axvline(target[0], color="black", linestyle="--", linewidth=1)
        ax.text(target[0], ys[0] + 0.45, f" {target[1]}", fontsize=7, va="bottom")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(unit, fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlim(0, right * 1.3 or 1)


SEGMENTRY, PEER, FLOOR = "#2b7bb9", "#d9822b", "#8a8a8a"


def enqueue_panel(ax: Any, results: dict[str, Any]) -> None:
    section = results["enqueue"]["enqueue"]
    items = []
    for name, data in section.items():
        color = SEGMENTRY if name.startswith("segmentry") else \
            PEER if name == "analytics-python" else FLOOR
        items.append((name, values(data["runs"]), color))
    _bars(ax, "enqueue: track() calls/s (bench_enqueue)", items, "events/s")


def e2e_panel(ax: Any, results: dict[str, Any]) -> None:
    runs = results["delivery"]["e2e"]["runs"]
    ap = spread(values(runs["analytics-python"]))["median"]
    items = [("segmentry", values(runs["segmentry"]), SEGMENTRY),
             ("analytics-python", values(runs["analytics-python"]), PEER)]
    if runs.get("segmentry-flusher-process"):
        items.append(("segmentry flusher=None\n+ flusher process",
                      values(runs["segmentry-flusher-process"]), SEGMENTRY))
    _bars(ax, f"end to end: {results['delivery']['e2e']['events']:,} events enqueued -> received",
          items, "events/s", (2 * ap, "target 2x analytics-python"))


def replay_panel(ax: Any, results: dict[str, Any]) -> None:
    replay = results["delivery"]["replay"]
    runs = replay["runs"]
    limit = max(spread(values(runs[k]))["median"] for k in ("raw-8", "raw-1"))
    _bars(ax, f"replay of a {replay['rows']:,}-event backlog vs the raw POST limit",
          [("flusher --drain", values(runs["flusher"]), SEGMENTRY),
           ("flusher (incl. start-up)", values(runs["flusher"], "rate_wall"), SEGMENTRY),
           ("raw requests x8 threads", values(runs["raw-8"]), FLOOR),
           ("raw requests x1 thread", values(runs["raw-1"]), FLOOR)], "events/s",
          (0.75 * limit, "target 0.75x limit"))


def rtt_panel(ax: Any, results: dict[str, Any]) -> None:
    rtt = results["delivery"]["rtt"]
    runs = rtt["runs"]
    _bars(ax, f"replay with a {rtt['delay_ms']:g} ms round trip ({rtt['rows']:,} events)",
          [("segmentry max_in_flight=8", values(runs["segmentry-mif8"]), SEGMENTRY),
           ("segmentry max_in_flight=1", values(runs["segmentry-mif1"]), SEGMENTRY),
           ("analytics-python", values(runs["analytics-python"]), PEER)], "events/s",
          (10_000, "target 10 k/s"))


def sigkill_panel(ax: Any, results: dict[str, Any]) -> None:
    kill = results["delivery"]["sigkill"]
    runs = kill["runs"]
    _bars(ax, f"SIGKILL after {kill['k']:,} returned events: share lost",
          [("segmentry", values(runs["segmentry"], "lost_pct"), SEGMENTRY),
           ("analytics-python", values(runs["analytics-python"], "lost_pct"), PEER)],
          "% of returned events never delivered")


def fleet_panel(ax: Any, results: dict[str, Any]) -> None:
    phase = results["fleet"]["phases"]["outage"]
    rows = phase["timeline"]
    times, total, ok, limited, failed = [], [], [], [], []
    for before, after in zip(rows, rows[4:]):  # 4 samples: about one second
        dt = after[0] - before[0]
        times.append(after[0])
        total.append((after[1] - before[1]) / dt)
        ok.append((after[2] - before[2]) / dt)
        limited.append((after[3] - before[3]) / dt)
        failed.append((after[4] - before[4]) / dt)
    ax.plot(times, total, color="black", linewidth=1, label="all requests")
    ax.plot(times, ok, color=SEGMENTRY, linewidth=1, label="200")
    ax.plot(times, limited, color=PEER, linewidth=1, label="429")
    ax.plot(times, failed, color="#b9372b", linewidth=1, label="503")
    start, length = phase["outage"]
    ax.axvspan(start, start + length, color="#b9372b", alpha=0.1, label="outage")
    ax.axhline(phase["limit"], color="black", linestyle="--", linewidth=1, label="R")
    ax.set_title(f"fleet: {len(phase['hosts'])} hosts, R = {phase['limit']:g} req/s, "
                 "outage then recovery", fontsize=9)
    ax.set_xlabel("seconds", fontsize=8)
    ax.set_ylabel("requests/s (1 s windows)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, loc="upper right")


PANELS: list[tuple[str, str, Panel]] = [
    ("enqueue", "enqueue", enqueue_panel), ("delivery", "e2e", e2e_panel),
    ("delivery", "replay", replay_panel), ("delivery", "rtt", rtt_panel),
    ("delivery", "sigkill", sigkill_panel), ("fleet", "phases", fleet_panel)]


def render(results: dict[str, Any], path: str) -> bool:
    """Draw every panel the results have data for into ``path``; False if none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for bench, key, draw in PANELS:
        data = results.get(bench) or {}
        if data.get(key) and (draw is not fleet_panel or "outage" in data[key]):
            panels.append(draw)
    if not panels:
        return False
    cols = 2
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(13, 3.6 * rows), squeeze=False)
    for ax, draw in zip(axes.flat, panels):
        draw(ax, results)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("segmentry benchmarks: median of runs, whiskers min–max", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
