"""A load test's result as people read it: the summary table, the JSON file, and a
self-contained HTML page of charts (inline SVG: no script, no network, no plotting
library), all made from the one ``Result`` (``result.py``).

    result ─▶ table()      the budget lines and the main figures, for the terminal
           ─▶ write_json() every figure, the distributions as 101 percentiles each
           ─▶ write_html() latency distributions (CDFs), memory, sessions and CPU
                           over time, and the capacity steps
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from scripts.loadtest.result import Clients, Result, Summary, Turns, encode

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")
DISTRIBUTIONS = (
    ("reload_ms", "Reload, client-observed"),
    ("session_start_ms", "Session start (to the default set listed)"),
    ("first_audio_ms", "End of utterance to first reply audio"),
    ("frame_lateness_ms", "Audio-frame lateness"),
    ("frame_lateness_baseline_ms", "Audio-frame lateness in the calm phases"),
    ("interrupted_at_ms", "Reply audio received when an interruption began"),
)

MEASURED = {"capacity": ", the best window in budget", "reload-storm": ", storm phases"}
"""Which part of the run the lateness and first-audio figures come from."""


# ── the table ────────────────────────────────────────────────────────────────


def _number(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = (f"{value:.2g}" if 0 < abs(value) < 1 else
                f"{value:.1f}" if abs(value) < 1000 else f"{value:.0f}")
    else:
        text = str(value)
    return f"{text} {unit}".strip()


def _latency(figures: Summary | None) -> str:
    if figures is None or not figures.count:
        return "-"
    return (f"p50 {_number(figures.p50)} / p95 {_number(figures.p95)} / "
            f"p99 {_number(figures.p99)} / max {_number(figures.max)} ms "
            f"(n={figures.count})")


def _clients(clients: Clients) -> str:
    if clients.interruptions:
        offsets = " / ".join(f"{o:g}" for o in clients.interruption_offsets_s)
        parts = [f"interrupt {clients.interruptions_per_cycle} replies a cycle "
                 f"({offsets} s after their expected first audio)"]
    else:
        parts = ["never interrupt"]
    if clients.compression:
        parts.append(f"offer {clients.compression} (negotiated by "
                     f"{clients.sessions_with_compression}, refused to "
                     f"{clients.sessions_refused_compression})")
    else:
        parts.append("no compression")
    return "; ".join(parts)


def _interruptions(result: Result) -> str:
    text = str(result.interruptions_made)
    if result.interruptions_missed:
        text += f" (and {result.interruptions_missed} that found no reply going)"
    at = result.interrupted_at_ms
    points = result.distributions.get("interrupted_at_ms")
    if at.count and points:
        text += (f"; reply audio received when they began: min {_number(points[0])} / "
                 f"p50 {_number(at.p50)} / max {_number(at.max)} ms")
    if result.stale_frames:
        text += f"; frames after their reply ended {result.stale_frames} (not counted)"
    if result.questions_over_late_replies:
        text += (f"; questions begun while a late reply still played "
                 f"{result.questions_over_late_replies}")
    return text


def _turns(turns: Turns) -> str:
    if not turns.asked:
        return "-"
    return (f"asked {turns.asked}, answered {turns.answered} "
            f"(merged with the next {turns.merged}), superseded {turns.superseded}, "
            f"in flight at the end {turns.in_flight}, "
            f"unanswered {turns.unanswered}; unprompted replies {turns.unprompted}")


def table(result: Result) -> str:
    """The summary printed at the end of a run."""
    rows: list[tuple[str, str]] = [
        ("scenario", f"{result.scenario} against {result.target.url}"
         + (" (spawned, fake backends)" if result.target.spawned else "")),
        ("sessions held / requested", f"{result.sessions_held} / {result.sessions_requested}"),
        ("clients", _clients(result.clients)),
        ("reload", _latency(result.reload_ms)),
        ("  the server's duration_ms", _latency(result.reload_server_ms)),
        ("session start", _latency(result.session_start_ms)),
        ("first reply audio", _latency(result.first_audio_ms)),
        ("frame lateness", _latency(result.frame_lateness_ms)),
    ]
    if result.frame_lateness_baseline_ms:
        rows.append(("  in the calm phases", _latency(result.frame_lateness_baseline_ms)))
    rows += [
        ("load generator lag", _latency(result.client_loop_lag_ms)),
        ("isolation violations", f"{result.isolation_violations} "
         f"(mismatched sets {result.reload_mismatches}, "
         f"answers checked {result.answers_checked})"),
        ("errors by code", ", ".join(f"{code} {count}" for code, count in
                                     sorted(result.errors_by_code.items())) or "none"),
        ("replies (response.done)", ", ".join(f"{status} {count}" for status, count in
                                              sorted(result.responses.items())) or "none"),
        ("interruptions made", _interruptions(result)),
        ("turns", _turns(result.turns)),
        ("server RSS", _number(result.server_rss_mb, "MB")),
        ("sandbox PSS per session", _number(result.sandbox_pss_mb_per_session, "MB")),
        ("memory per session", _number(result.memory_mb_per_session, "MB")
         + " (server PSS + sandboxes, over the idle server)"),
        ("CPU", ", ".join(f"{name} {share:.0f} %" for name, share in
                          result.cpu_percent.items()) or "-"),
        ("leftover processes", _number(result.leftover_processes)
         + (f" (besides {result.warm_children_at_end} children kept warm on purpose)"
            if result.warm_children_at_end else "")),
        ("orphans after server stop", _number(result.orphan_processes)),
    ]
    if (admin := result.admin_api_at_end) is not None:
        rows.append(("admin API at the end", f"{admin.sessions_listed} sessions listed, "
                     f"median sandbox PSS {_number(admin.sandbox_pss_mb_median, 'MB')}, "
                     f"answered in {_number(admin.answered_in_ms, 'ms')}"))
    for label, section in (("capacity", result.capacity), ("reload storm", result.reload_storm),
                           ("churn", result.churn)):
        if section is not None:
            rows.append((label, ", ".join(
                f"{k} {_number(v)}" for k, v in msgspec.structs.asdict(section).items()
                if not isinstance(v, list | dict))))
    width = max(len(label) for label, _ in rows)
    lines = [f"{label.ljust(width)}  {value}" for label, value in rows]
    lines.append("")
    lines.append("budgets (DESIGN.md section 8):")
    for budget in result.budgets:
        verdict = {True: "ok  ", False: "MISS", None: "n/a "}[budget.ok]
        binding = "" if budget.binding else " (for reference)"
        note = f"  {budget.note}" if budget.note else ""
        lines.append(f"  {verdict} {budget.name}: {_number(budget.value, budget.unit)} "
                     f"{budget.comparison} {_number(budget.limit, budget.unit)}"
                     f"{binding}{note}")
    lines.append("")
    lines.append("PASSED: every budget met" if result.passed
                 else "FAILED: a budget or the isolation check failed")
    return "\n".join(lines)


def write_json(result: Result, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(result))


# ── charts ───────────────────────────────────────────────────────────────────


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values, the first at or below ``low`` and the last
    at or above ``high``."""
    if not math.isfinite(low) or not math.isfinite(high):
        return [0.0]
    if high <= low:
        high = low + 1
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step + 1e-9)
    last = math.ceil(high / step - 1e-9)
    return [round(i * step, 10) for i in range(first, last + 1)]


def line_chart(title: str, series: Sequence[tuple[str, Sequence[float], Sequence[float]]],
               x_label: str, y_label: str, width: int = 560, height: int = 300) -> str:
    """An SVG line chart; ``series`` holds (label, xs, ys)."""
    drawn = [(label, xs, ys) for label, xs, ys in series if len(xs) and len(ys)]
    left, right, top, bottom = 64, 16, 40 + 14 * ((len(drawn) + 2) // 3), 46
    plot_w, plot_h = width - left - right, height - top - bottom
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="{html.escape(title)}">',
             f'<text x="{width / 2}" y="18" text-anchor="middle" font-weight="bold">'
             f'{html.escape(title)}</text>']
    if not drawn:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" '
                     'fill="#888">no data</text></svg>')
        return "".join(parts)
    xs_all = [x for _, xs, _ in drawn for x in xs]
    ys_all = [y for _, _, ys in drawn for y in ys]
    x_ticks = nice_ticks(min(xs_all), max(xs_all))
    y_ticks = nice_ticks(min(0.0, min(ys_all)), max(ys_all))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def sx(x: float) -> float:
        return left + (x - x0) / ((x1 - x0) or 1) * plot_w

    def sy(y: float) -> float:
        return top + plot_h - (y - y0) / ((y1 - y0) or 1) * plot_h

    for tick in x_ticks:
        parts.append(f'<line x1="{sx(tick):.1f}" y1="{top}" x2="{sx(tick):.1f}" '
                     f'y2="{top + plot_h}" stroke="#eee"/>'
                     f'<text x="{sx(tick):.1f}" y="{top + plot_h + 16}" text-anchor="middle" '
                     f'font-size="11">{tick:g}</text>')
    for tick in y_ticks:
        parts.append(f'<line x1="{left}" y1="{sy(tick):.1f}" x2="{left + plot_w}" '
                     f'y2="{sy(tick):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{sy(tick) + 4:.1f}" text-anchor="end" '
                     f'font-size="11">{tick:g}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" '
                 'fill="none" stroke="#888"/>')
    for index, (label, xs, ys) in enumerate(drawn):
        color = COLORS[index % len(COLORS)]
        points = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys, strict=False))
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6" '
                     f'points="{points}"><title>{html.escape(label)}</title></polyline>')
        parts.append(f'<text x="{left + (index % 3) * plot_w / 3:.1f}" '
                     f'y="{36 + 14 * (index // 3)}" font-size="11" '
                     f'fill="{color}">&#9644; {html.escape(label)}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 8}" text-anchor="middle" '
                 f'font-size="12">{html.escape(x_label)}</text>')
    parts.append(f'<text x="14" y="{top + plot_h / 2}" text-anchor="middle" font-size="12" '
                 f'transform="rotate(-90 14 {top + plot_h / 2})">{html.escape(y_label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _cdf(points: Sequence[float]) -> tuple[list[float], list[float]]:
    """x = the value at each percentile, y = the percentile."""
    return list(points), list(range(len(points)))


def write_html(result: Result, path: Path) -> None:
    distributions = result.distributions
    charts = []
    measured = MEASURED.get(result.scenario, "")
    for key, label in DISTRIBUTIONS:
        points = distributions.get(key)
        if points:
            xs, ys = _cdf(points)
            if key in ("frame_lateness_ms", "first_audio_ms"):
                label += measured
            charts.append(line_chart(f"{label} (CDF)", [(key, xs, ys)], "milliseconds",
                                     "percentile"))
    timeline = result.timeline
    t = [p.t for p in timeline]
    memory = [("server RSS", [p.t for p in timeline if p.server_rss_mb is not None],
               [p.server_rss_mb for p in timeline if p.server_rss_mb is not None]),
              ("sandboxes PSS (all children)",
               [p.t for p in timeline if p.sandbox_pss_mb is not None],
               [p.sandbox_pss_mb for p in timeline if p.sandbox_pss_mb is not None])]
    charts.append(line_chart("Memory over time", memory, "seconds", "MB"))
    charts.append(line_chart("Sessions over time", [
        ("open", t, [p.sessions_open for p in timeline]),
        ("streaming audio", t, [p.streaming for p in timeline]),
    ], "seconds", "sessions"))
    cpu = [(p.t, p.cpu_percent) for p in timeline if p.cpu_percent is not None]
    cpu_keys = sorted({k for _, shares in cpu for k in shares})
    charts.append(line_chart("CPU over time (100 % = one core)", [
        (key, [at for at, shares in cpu if key in shares],
         [shares[key] for _, shares in cpu if key in shares])
        for key in cpu_keys], "seconds", "% of a core"))
    charts.append(line_chart("Frame lateness p99 over time (5 s windows)", [
        ("p99", [p.t for p in timeline if p.lateness_p99_ms is not None],
         [p.lateness_p99_ms for p in timeline if p.lateness_p99_ms is not None]),
    ], "seconds", "milliseconds"))
    steps = result.capacity.windows if result.capacity is not None else []
    judged = [(w.held, w.p99_ms) for w in steps if w.p99_ms is not None]
    if judged:
        charts.append(line_chart("Capacity: frame lateness p99 against sessions held", [
            ("p99", [held for held, _ in judged], [p99 for _, p99 in judged]),
            ("budget (20 ms)", [judged[0][0], judged[-1][0]], [20.0, 20.0]),
        ], "sessions held", "milliseconds"))
    title = f"Troupe load test: {result.scenario}"
    page = (
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;"
        "margin:1.5em}pre{background:#f6f6f6;padding:1em;white-space:pre-wrap}"
        "svg{margin:0.5em;background:#fff}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><pre>{html.escape(table(result))}</pre>"
        + "".join(charts) + "</body></html>\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
