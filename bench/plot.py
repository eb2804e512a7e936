"""Draws the benchmark's figures as SVG from bench/results.json (no plotting library:
the machine that runs scripts/bench.sh needs nothing more than Python).

    python3 bench/plot.py [RESULTS] [OUT_DIR]    (default: bench/results.json docs/)

Writes OUT_DIR/benchmarks-throughput.svg (TCP throughput by path, one and four
streams, each bar with its min-max range) and OUT_DIR/benchmarks-convergence.svg
(time from a new host's registration until the other hosts have it as a peer, by
cluster size: all-real labs, and one real host among simulated ones).
"""
import json
import re
import sys
from html import escape

results = sys.argv[1] if len(sys.argv) > 1 else "bench/results.json"
out_dir = sys.argv[2] if len(sys.argv) > 2 else "docs"
records = json.load(open(results))["records"]


def bars(title, unit, rows, path):
    """A horizontal bar chart: rows of (label, median, min, max, colour)."""
    label_w, chart_w, row_h, top = 330, 420, 26, 40
    height = top + row_h * len(rows) + 30
    peak = max(r[3] for r in rows) or 1
    scale = chart_w / peak
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + chart_w + 90}" '
        f'height="{height}" font-family="sans-serif" font-size="12">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="10" y="22" font-size="14" font-weight="bold">{escape(title)}</text>',
    ]
    for i, (label, median, low, high, colour) in enumerate(rows):
        y = top + i * row_h
        out.append(f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end">{escape(label)}</text>')
        out.append(f'<rect x="{label_w}" y="{y + 3}" width="{median * scale:.1f}" height="{row_h - 8}" fill="{colour}"/>')
        # The spread of the runs: a line from min to max.
        out.append(f'<line x1="{label_w + low * scale:.1f}" x2="{label_w + high * scale:.1f}" '
                   f'y1="{y + row_h / 2 - 1}" y2="{y + row_h / 2 - 1}" stroke="black"/>')
        out.append(f'<text x="{label_w + high * scale + 6:.1f}" y="{y + 15}">{median:.3g} {escape(unit)}</text>')
    out.append(f'<line x1="{label_w}" x2="{label_w}" y1="{top}" y2="{height - 30}" stroke="#888"/>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")
    print(f"plot: {path}", file=sys.stderr)


def throughput():
    colours = {"underlay": "#9e9e9e", "docker bridge": "#bdbdbd", "plain WireGuard": "#64b5f6",
               "weft cross-host": "#1565c0", "docker swarm overlay (VXLAN, unencrypted)": "#8e24aa"}
    rows = []
    for streams in ("1", "4"):
        for r in records:
            m = re.fullmatch(r"throughput (.+?)(, wireguard-go [\d.]+)? (\d) stream\(s\)", r["name"])
            if not m or m.group(3) != streams:
                continue
            path, old = m.group(1), m.group(2)
            label = f"{path}{' (Debian 12 wireguard-go)' if old else ''}, {streams} stream{'s' if streams != '1' else ''}"
            colour = colours.get(path, "#90a4ae")
            if old:
                colour = "#ffb74d" if path == "plain WireGuard" else "#e65100"
            rows.append((label, r["median"], r["min"], r["max"], colour))
    if rows:
        bars("TCP throughput by path (Gbit/s; line: min to max of the runs)", "Gbit/s", rows,
             f"{out_dir}/benchmarks-throughput.svg")


def convergence():
    rows = []
    for r in records:
        m = re.fullmatch(r"join convergence, (\d+)-host .*", r["name"])
        if m:
            rows.append((int(m.group(1)), f"{m.group(1)} hosts (all real)", "#1565c0", r))
        m = re.fullmatch(r"mesh: join convergence, (\d+) hosts \(simulated\).*", r["name"])
        if m:
            rows.append((int(m.group(1)), f"{m.group(1)} hosts (one real, simulated others)", "#64b5f6", r))
    rows.sort(key=lambda x: x[0])
    if rows:
        bars("New host programmed (peer and route), by cluster size (s)", "s",
             [(label, r["median"], r["min"], r["max"], colour) for _, label, colour, r in rows],
             f"{out_dir}/benchmarks-convergence.svg")


throughput()
convergence()
