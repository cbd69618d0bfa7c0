"""What a run shows and writes: progress, per-round lines, metrics.jsonl, summary.json, curves."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, TextIO

__all__ = ["Progress", "append_jsonl", "format_bytes", "read_jsonl", "round_line", "write_curves"]


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def round_line(m: dict[str, Any], total_rounds: int) -> str:
    """A round's line; an async run's rows are versions, with how stale their updates were."""
    stale = m.get("staleness")  # async only: {versions stale: updates}
    return (
        f"{'version' if stale is not None else 'round'} {m['round']:>3}/{total_rounds}  "
        f"acc {m['accuracy']:.4f}  loss {m['loss']:.4f}  "
        f"updates {m['accepted']} ok/{m['rejected']} rejected  "
        f"up {format_bytes(m['bytes_up'])}  down {format_bytes(m['bytes_down'])}  "
        f"agg {1000 * m['aggregation_latency_s']:.1f} ms{_tree(m)}  "
        f"cold starts {m['cold_starts']}"
        + ("" if stale is None else "  staleness " + (" ".join(
            f"{s}:{n}" for s, n in stale.items()) or "-"))
    )


def _tree(m: dict[str, Any]) -> str:
    """The aggregation tree of the round: leaves, levels, and shards when sharded."""
    tree = m.get("tree") or {}
    if not tree:
        return ""
    shards = int(tree.get("shards", 1))
    if shards > 1:
        return f" ({shards} shards)"
    leaves = int(tree.get("leaves", 1))
    levels = int(tree.get("levels", 1))
    return (f" ({leaves} {'leaf' if leaves == 1 else 'leaves'}, "
            f"{levels} level{'' if levels == 1 else 's'})")


class Progress:
    """A one-line progress bar on a terminal; silent when stderr is not one (CI, pipes)."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total, self.stream = total, stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.done = 0

    def update(self, done: int, note: str = "") -> None:
        self.done = done
        if not self.enabled:
            return
        width = 30
        filled = int(width * done / max(1, self.total))
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(f"\r[{bar}] {done}/{self.total} rounds {note}".ljust(79))
        self.stream.flush()

    def clear(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * 79 + "\r")
            self.stream.flush()


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with path.open("ab+") as f:
        # After a kill mid-write the last line is torn: end it, so this row stands alone.
        torn = f.seek(0, 2) > 0 and (f.seek(-1, 2), f.read(1))[1] != b"\n"
        f.write((b"\n" if torn else b"") + json.dumps(row, sort_keys=True).encode() + b"\n")
        f.flush()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line torn by a kill mid-write: the round is re-reported
    return rows


def write_curves(path: Path, rows: list[dict[str, Any]], started: float | None = None) -> bool:
    """Accuracy and loss per round (per version, async) as a PNG, and accuracy against
    the wall time since ``started`` (epoch s) when the rows say when each model was
    ready; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rounds = [r["round"] for r in rows]
    timed = started is not None and bool(rows) and all("model_ready_at" in r for r in rows)
    fig, axes = plt.subplots(1, 3 if timed else 2, figsize=(13.5 if timed else 9, 3.5))
    ax1, ax2 = axes[0], axes[1]
    ax1.plot(rounds, [r["accuracy"] for r in rows], marker="o", ms=3)
    ax1.set(xlabel="round", ylabel="test accuracy", title="Accuracy")
    ax2.plot(
        rounds,
        [r["loss"] if math.isfinite(r["loss"]) else None for r in rows],
        marker="o",
        ms=3,
        color="tab:red",
    )
    ax2.set(xlabel="round", ylabel="test loss", title="Loss")
    if timed:
        assert started is not None
        axes[2].plot([float(r["model_ready_at"]) - started for r in rows],
                     [r["accuracy"] for r in rows], marker="o", ms=3, color="tab:green")
        axes[2].set(xlabel="seconds since the run started", ylabel="test accuracy",
                    title="Accuracy against wall time")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
