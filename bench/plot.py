"""The bench's PNG: time to first event (p50 and p99) and upstream bytes per turn, per
contender and concurrency, from bench/results/latest.json. Runs in the bench venv."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main(source: Path, target: Path) -> None:
    data = json.loads(source.read_text())
    by: dict[str, list[dict]] = defaultdict(list)
    for row in data["rows"]:
        by[row["contender"]].append(row)
    figure, (ttfe, sizes) = plt.subplots(1, 2, figsize=(13, 5))
    for name, rows in by.items():
        rows.sort(key=lambda r: r["sessions"])
        sessions = [r["sessions"] for r in rows]
        p50 = [r["ttfe_p50_ms"] for r in rows]
        p99 = [r["ttfe_p99_ms"] for r in rows]
        (line,) = ttfe.plot(sessions, p50, marker="o", label=f"{name} p50")
        color = line.get_color()
        ttfe.plot(sessions, p99, marker="x", linestyle="--", color=color, label=f"{name} p99")
    ttfe.set_xscale("log", base=2)
    ttfe.set_yscale("log")
    ttfe.set_xlabel("concurrent sessions")
    ttfe.set_ylabel("time to first event, ms")
    ttfe.legend(fontsize=7)
    ttfe.grid(True, alpha=0.3)
    long = data["long_session"]
    series = [
        ("full_http_bytes", "full-context HTTP"),
        ("trioproxy_bytes", "trioproxy"),
        ("direct_bytes", "direct"),
        ("trioproxy_wire_bytes", "trioproxy on the wire (permessage-deflate)"),
    ]
    for key, label in series:
        values = long.get(key)
        if values:
            sizes.plot(range(1, len(values) + 1), [v / 1000 for v in values], label=label)
    # The gateways not in the long session: their one-session sweep run (20 turns).
    for name in ("litellm", "codex_lb"):
        one = next((r for r in by.get(name, []) if r["sessions"] == 1), None)
        if one and one.get("turn_bytes"):
            values = one["turn_bytes"]
            sizes.plot(range(1, len(values) + 1), [v / 1000 for v in values], linestyle=":",
                       label=f"{name} (its 1-session run)")  # fmt: skip
    sizes.set_yscale("log")
    sizes.set_xlabel(f"turn of one {long['turns']}-turn codex-shaped session")
    sizes.set_ylabel("upstream bytes per turn, KB")
    sizes.legend(fontsize=7)
    sizes.grid(True, alpha=0.3)
    figure.suptitle(f"trioproxy bench ({data['profile']}, {data['when']})")
    figure.tight_layout()
    figure.savefig(target, dpi=110)
    print(f"wrote {target}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
