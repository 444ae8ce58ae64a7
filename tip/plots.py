"""Pictures of a run's token taxonomy.

    python -m tip.plots RUN_DIR

reads RUN_DIR/tokens.jsonl (records of `tip.dump.token_records`) and
RUN_DIR/metrics.jsonl (one JSON object per line with "step" and the `tip/`
keys of `tip.taxonomy.diagnostics`) and writes into RUN_DIR/plots/:

    hd_plane.png          2-D histogram of the (h, delta) plane of the dumped
                          tokens, delta on a symlog axis, quadrant thresholds
                          dashed, kept tokens dotted on top
    quadrant_shares.png   share of all tokens and of kept tokens per quadrant, over steps

Each picture needs only its own file; a missing one is reported and skipped.
No run directory, or neither file, is an error (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

QUADRANTS = {
    1: ("Q1 high h, high δ", "#d62728"),
    2: ("Q2 high h, low δ", "#ff7f0e"),
    3: ("Q3 low h, high δ", "#9467bd"),
    4: ("Q4 low h, low δ", "#7f7f7f"),
}


class PlotError(Exception):
    """Nothing can be drawn; the message is one line."""


def _read_jsonl(path: Path) -> list[dict]:
    records, bad = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            # a run killed mid-write leaves a torn last line; the rest is still good
            bad += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    if bad:
        print(f"tip.plots: skipped {bad} malformed line(s) in {path}", file=sys.stderr)
    return records


def _pyplot():
    import matplotlib  # on demand: a heavy import that training without pictures never needs

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    return plt


def _thresholds(tokens: list[dict], metrics: list[dict]) -> tuple[float | None, float | None]:
    """Cut points for the dashed lines: the logged ones averaged over the dumped steps, else inferred from the labels."""
    steps = {r.get("step") for r in tokens}
    logged = [m for m in metrics if "tip/entropy_threshold" in m and m.get("step") in steps] or [m for m in metrics if "tip/entropy_threshold" in m]
    if logged:
        return (
            sum(m["tip/entropy_threshold"] for m in logged) / len(logged),
            sum(m["tip/divergence_threshold"] for m in logged) / len(logged),
        )

    def between(key: str, high: set[int]) -> float | None:
        hi = [r[key] for r in tokens if r["quadrant"] in high]
        lo = [r[key] for r in tokens if r["quadrant"] not in high]
        return (min(hi) + max(lo)) / 2 if hi and lo else None

    return between("entropy", {1, 2}), between("divergence", {1, 3})


def _hd_plane(tokens: list[dict], metrics: list[dict], path: Path) -> None:
    plt = _pyplot()
    from matplotlib.colors import LogNorm  # on demand, like _pyplot

    h = np.array([r["entropy"] for r in tokens], dtype=float)
    d = np.clip(np.array([r["divergence"] for r in tokens], dtype=float), 0.0, None)
    kept = np.array([bool(r.get("kept", False)) for r in tokens])
    quad = np.array([int(r.get("quadrant", 0)) for r in tokens])

    # the linear part of the symlog axis reaches down to the typical small divergence
    positive = d[d > 0]
    linthresh = 10.0 ** math.floor(math.log10(np.quantile(positive, 0.05))) if positive.size else 1e-3
    linthresh = min(max(linthresh, 1e-6), 1.0)
    h_max = min(1.0, max(float(h.max()) * 1.05, 1e-3))
    d_max = max(float(d.max()) * 1.2, 10 * linthresh)

    fig, ax = plt.subplots(figsize=(8, 6), dpi=120)
    ax.set_yscale("symlog", linthresh=linthresh)
    scale = ax.yaxis.get_transform()
    # bins equally wide in the displayed (symlog) coordinate
    y_edges = scale.inverted().transform(np.linspace(scale.transform(0.0), scale.transform(d_max), 41))
    x_edges = np.linspace(0.0, h_max, 41)
    counts, _, _ = np.histogram2d(h, d, bins=[x_edges, y_edges])
    mesh = ax.pcolormesh(x_edges, y_edges, np.ma.masked_equal(counts.T, 0), cmap="Blues", norm=LogNorm(vmin=1, vmax=max(counts.max(), 1)))
    fig.colorbar(mesh, ax=ax, label="dumped tokens per bin")

    if kept.any():
        rng = np.random.default_rng(0)
        idx = np.flatnonzero(kept)
        if idx.size > 3000:
            idx = np.sort(rng.choice(idx, 3000, replace=False))
        ax.scatter(h[idx], d[idx], s=6, c="#e6550d", alpha=0.6, linewidths=0, label=f"kept ({int(kept.sum())} of {len(tokens)})")
        ax.legend(loc="upper center", fontsize=8, framealpha=0.8)

    h_cut, d_cut = _thresholds(tokens, metrics)
    if h_cut is not None:
        ax.axvline(h_cut, color="k", ls="--", lw=1)
    if d_cut is not None:
        ax.axhline(d_cut, color="k", ls="--", lw=1)
    corners = {1: (0.98, 0.97, "right", "top"), 2: (0.98, 0.03, "right", "bottom"), 3: (0.02, 0.97, "left", "top"), 4: (0.02, 0.03, "left", "bottom")}
    for q, (x, y, ha, va) in corners.items():
        share = float((quad == q).mean()) if quad.size else 0.0
        kept_share = float((quad[kept] == q).mean()) if kept.any() else 0.0
        ax.text(x, y, f"{QUADRANTS[q][0]}\nall {share:.0%}, kept {kept_share:.0%}", transform=ax.transAxes, ha=ha, va=va, fontsize=8,
                color=QUADRANTS[q][1], bbox=dict(facecolor="white", alpha=0.8, edgecolor="none"))

    steps = sorted({r.get("step", 0) for r in tokens})
    span = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}–{steps[-1]}"
    ax.set_title(f"Token taxonomy plane: {len(tokens)} dumped tokens, {span}")
    ax.set_xlabel("normalised student entropy h = H(P_S) / log V")
    ax.set_ylabel("reverse KL δ = KL(P_S ‖ P_T), nats (symlog)")
    ax.set_xlim(0.0, h_max)
    ax.set_ylim(0.0, d_max)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _per_step(metrics: list[dict]) -> tuple[list, dict[str, list[float]]]:
    """Mean of each tip/ share key per step (several lines may log the same step)."""
    keys = [f"tip/q{q}_share" for q in QUADRANTS] + [f"tip/kept_q{q}_share" for q in QUADRANTS]
    sums: dict = {}
    for m in metrics:
        if "step" not in m or not all(k in m for k in keys):
            continue
        acc = sums.setdefault(m["step"], [0, {k: 0.0 for k in keys}])
        acc[0] += 1
        for k in keys:
            acc[1][k] += float(m[k])
    steps = sorted(sums)
    return steps, {k: [sums[s][1][k] / sums[s][0] for s in steps] for k in keys}


def _quadrant_shares(steps: list, series: dict[str, list[float]], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.2), dpi=120, sharey=True)
    for ax, prefix, title in ((axes[0], "tip/q", "all response tokens"), (axes[1], "tip/kept_q", "kept tokens")):
        # stacked: the four shares add up to 1, and equal shares (quantile thresholds) do not hide each other
        ys = [series[f"{prefix}{q}_share"] for q in QUADRANTS]
        labels = [label for label, _ in QUADRANTS.values()]
        colors = [color for _, color in QUADRANTS.values()]
        if len(steps) > 1:
            ax.stackplot(steps, ys, labels=labels, colors=colors, alpha=0.85)
            ax.set_xlim(steps[0], steps[-1])
        else:
            bottom = 0.0
            for y, label, color in zip(ys, labels, colors):
                ax.bar(steps, y, bottom=bottom, label=label, color=color, alpha=0.85, width=0.6)
                bottom += y[0]
            ax.set_xticks(steps)
        ax.set_title(f"Quadrant shares of {title}")
        ax.set_xlabel("step")
        ax.set_ylim(0.0, 1.0)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share")
    axes[1].legend(*axes[0].get_legend_handles_labels(), fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def render(run_dir: str | Path) -> list[Path]:
    """Write the pictures of RUN_DIR into RUN_DIR/plots/ and return their paths.

    Raises PlotError (one line) when the run directory or both input files are
    missing, or when neither file holds anything to draw.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PlotError(f"{run_dir}: run directory not found")
    tokens_path, metrics_path = run_dir / "tokens.jsonl", run_dir / "metrics.jsonl"
    if not tokens_path.is_file() and not metrics_path.is_file():
        raise PlotError(f"{run_dir}: neither tokens.jsonl nor metrics.jsonl found; nothing to plot")
    tokens = _read_jsonl(tokens_path) if tokens_path.is_file() else []
    metrics = _read_jsonl(metrics_path) if metrics_path.is_file() else []
    tokens = [r for r in tokens if "entropy" in r and "divergence" in r]
    steps, series = _per_step(metrics)

    out_dir = run_dir / "plots"
    written = []
    if tokens:
        out_dir.mkdir(exist_ok=True)
        _hd_plane(tokens, metrics, out_dir / "hd_plane.png")
        written.append(out_dir / "hd_plane.png")
    else:
        print(f"tip.plots: no token records in {tokens_path} (set tip.dump_tokens > 0); skipping hd_plane.png", file=sys.stderr)
    if steps:
        out_dir.mkdir(exist_ok=True)
        _quadrant_shares(steps, series, out_dir / "quadrant_shares.png")
        written.append(out_dir / "quadrant_shares.png")
    else:
        print(f"tip.plots: no tip/ quadrant shares in {metrics_path}; skipping quadrant_shares.png", file=sys.stderr)
    if not written:
        raise PlotError(f"{run_dir}: no token records and no tip/ metrics to plot")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tip.plots", description="Draw the token-taxonomy pictures of a run directory.")
    parser.add_argument("run_dir", help="run directory holding tokens.jsonl and/or metrics.jsonl")
    args = parser.parse_args(argv)
    try:
        paths = render(args.run_dir)
    except PlotError as exc:
        print(f"tip.plots: {exc}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
