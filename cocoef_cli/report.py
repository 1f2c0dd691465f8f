"""Figures and tables from run folders (seaborn, Agg backend): means over seeds with 95% bands.

* :func:`load_runs` reads every run under a folder (one run, a ``cocoef sweep`` output, or the
  nested run folders of ``cocoef figures``): the rows of each ``metrics.csv`` plus the run's
  status and its flattened config (``optim.lr``, ``compressor.ratio``, ...) as extra columns.
* :func:`line_panels` draws y against x (iterations, cumulative bits, simulated time), one panel
  per x column and/or per value of a facet column; :func:`final_figure` draws the final value
  (last evaluated iteration) against a swept key. Every method/compressor pair has a fixed colour
  and dash pattern (:func:`style_for`) so it looks the same in every figure.
* :func:`report` (behind ``cocoef report``): default figures + ``summary.md`` for any runs folder.

Runs whose ``run.json`` says ``diverged`` or ``failed`` are never plotted; they are listed in the
summary and named in a note under the figure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from cocoef_cli.errors import ConfigError
from cocoef_cli.record import final_rows, flatten, read_record

AXIS_LABELS = {
    "iter": "iteration",
    "bits_up": "cumulative uplink bits, all devices (bits)",
    "sim_time": "simulated wall-clock time (s)",
    "opt_gap": "optimality gap F(θ) − F*",
    "train_loss": "training loss F(θ)",
    "test_loss": "test loss",
    "test_acc": "test accuracy",
    "grad_norm": "‖∇F(θ)‖",
    "ef_norm": "‖E‖_F (error memory)",
    "n_received": "devices answering",
    "p": "straggler probability p",
    "d": "redundancy d (devices per partition)",
    "compressor.ratio": "compression level k/D",
    "compressor.group": "grouped sign: group size (coordinates)",
    "optim.lr": "step size η",
}
LOG_COLUMNS = {"bits_up", "opt_gap", "train_loss", "grad_norm", "test_loss", "ef_norm", "optim.lr"}
GAP_FLOOR = 1e-8  # optimality gaps below this (float32 rounding) are drawn at this floor
METRICS = ("train_loss", "test_loss", "test_acc", "grad_norm", "opt_gap", "bits_up", "sim_time")

# Fixed colour and dash pattern per (method, compressor), or per method ("*"), used by every figure.
# Solid: error feedback with a biased compressor; dashed: the same compressors without EF;
# dash-dot: unbiased compressors; dotted: full precision.
_SOLID, _DASH, _DASHDOT, _DOT = "", (5, 2), (6, 2, 1, 2), (1.5, 1.5)
STYLES: dict[tuple[str, str], tuple[str, Any]] = {
    ("coco_ef", "topk"): ("#d62728", _SOLID),
    ("coco_ef", "grouped_sign"): ("#ff7f0e", _SOLID),
    ("coco_ef", "*"): ("#e6550d", _SOLID),
    ("coco", "topk"): ("#1f77b4", _DASH),
    ("coco", "grouped_sign"): ("#17becf", _DASH),
    ("coco", "randk_unbiased"): ("#2ca02c", _DASHDOT),
    ("coco", "qsgd"): ("#bcbd22", _DASHDOT),
    ("coco", "onebit"): ("#9467bd", _DASHDOT),
    ("coco", "*"): ("#6baed6", _DASH),
    ("coco_diana", "*"): ("#8c564b", (3, 1, 1, 1, 1, 1)),
    ("coco_ef21", "*"): ("#fd8d3c", (8, 2)),
    ("ef_sgd", "*"): ("#e377c2", _SOLID),
    ("gc", "*"): ("#000000", _DOT),
    ("ignore_stragglers", "*"): ("#7f7f7f", _DOT),
    ("gd", "*"): ("#393b79", (1, 3)),
}
# Fixed marker per method/compressor (final-value figures), so a method also keeps its marker.
MARKERS: dict[tuple[str, str], str] = {
    ("coco_ef", "topk"): "o",
    ("coco_ef", "grouped_sign"): "X",
    ("coco_ef", "*"): "P",
    ("coco", "topk"): "s",
    ("coco", "grouped_sign"): "D",
    ("coco", "randk_unbiased"): "^",
    ("coco", "qsgd"): "v",
    ("coco", "onebit"): "<",
    ("coco", "*"): ">",
    ("coco_diana", "*"): "p",
    ("coco_ef21", "*"): "h",
    ("ef_sgd", "*"): "*",
    ("gc", "*"): "d",
    ("ignore_stragglers", "*"): "8",
    ("gd", "*"): "H",
}
_SPARE = ["#637939", "#843c39", "#7b4173", "#3182bd", "#31a354", "#756bb1", "#636363", "#e7ba52"]


def style_for(method: str, compressor: str = "*") -> tuple[str, Any]:
    """(colour, dashes) of a method arm: fixed for the known pairs, stable for the others."""
    for key in ((method, compressor), (method, "*")):
        if key in STYLES:
            return STYLES[key]
    h = sum(ord(c) * (i + 1) for i, c in enumerate(f"{method}/{compressor}"))
    return _SPARE[h % len(_SPARE)], _SOLID


def marker_for(method: str, compressor: str = "*") -> str:
    for key in ((method, compressor), (method, "*")):
        if key in MARKERS:
            return MARKERS[key]
    return "o"


def label(col: str) -> str:
    return AXIS_LABELS.get(col, col)


# ------------------------------------------------------------------------------------ loading
def run_dirs(root: Path) -> list[Path]:
    """Run folders under ``root``: ``root`` itself when it holds a run, else every folder below it
    with a ``run.json`` (Hydra's ``.hydra`` folders excluded)."""
    root = Path(root)
    if (root / "run.json").exists() or (root / "metrics.csv").exists():
        return [root]
    return sorted(p.parent for p in root.rglob("run.json") if ".hydra" not in p.parts)


def load_runs(root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows, runs). ``rows``: every metrics row of every run with columns ``run`` (folder relative
    to ``root``), ``status`` and the flattened config keys that are not already metrics columns.
    ``runs``: one row per run folder (run, status, diverged detail, wall_s, config keys)."""
    root = Path(root)
    frames, runs = [], []
    for folder in run_dirs(root):
        rel = str(folder.relative_to(root)) if folder != root else folder.name
        rec = read_record(folder)
        cfg = {k: v for k, v in flatten(rec.get("config", {})).items() if not k.startswith("hydra")}
        info = {
            "run": rel,
            "status": rec.get("status", "unknown"),
            "wall_s": rec.get("wall_s"),
            "diverged": rec.get("diverged"),
            **cfg,
        }
        path = folder / "metrics.csv"
        if path.exists():
            if info["status"] == "unknown":
                info["status"] = "completed"
            df = pd.read_csv(path)
            extra = {k: v for k, v in cfg.items() if k not in df.columns}
            frames.append(df.assign(run=rel, status=info["status"], **extra))
        runs.append(info)
    if not runs:
        raise ConfigError(
            "RUNS_DIR",
            str(root),
            "a run folder (metrics.csv, run.json) or a sweep/figures folder holding run folders",
            "no runs found",
        )
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return rows, pd.DataFrame(runs)


# ------------------------------------------------------------------------------------ drawing
def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _arm(data: pd.DataFrame, hue: str, h: Any) -> tuple[str, str]:
    """(method, compressor) of curve ``h``: its first row's, else (``h``, "*")."""
    sub = data[data[hue] == h]
    m = str(sub["method"].iloc[0]) if "method" in sub and len(sub) else str(h)
    c = str(sub["compressor"].iloc[0]) if "compressor" in sub and len(sub) else "*"
    return m, c


def _styles(data: pd.DataFrame, hue: str, order: Sequence[str]) -> tuple[dict, dict]:
    pal, dashes = {}, {}
    for h in order:
        pal[h], dashes[h] = style_for(*_arm(data, hue, h))
    if len(set(pal.values())) < len(pal):  # the same method/compressor twice (e.g. two step sizes)
        import seaborn as sns

        pal = dict(zip(order, sns.color_palette("tab10" if len(order) <= 10 else "tab20", len(order))))
    return pal, dashes


def _spans_decades(values: pd.Series) -> bool:
    v = pd.to_numeric(values, errors="coerce").dropna()
    return bool(len(v) and (v > 0).all() and v.max() / v.min() >= 20)


def save_figure(fig: Any, out: Path, dpi: int = 110) -> Path:
    """PNG (a 256-colour palette image: about 3× smaller than RGBA at the same resolution, ≲ 100 KB
    for a 3-panel figure, and visually identical for line plots) and PDF."""
    import io

    from PIL import Image

    out = Path(out).with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.12, facecolor="white")
    buf.seek(0)
    img = Image.open(buf).convert("RGB")
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out, optimize=True)
    fig.savefig(out.with_suffix(".pdf"), bbox_inches="tight", pad_inches=0.12)
    pyplot().close(fig)
    return out


def _finish(fig: Any, ax: Any, n_items: int, n_panels: int, title: str, excluded: Sequence[str]) -> None:
    """Title, layout, then one shared legend below the panels (from ``ax``'s entries) and a note
    naming the runs that were not plotted: see :func:`_finish_legend`."""
    handles, labels = ax.get_legend_handles_labels()
    for a in fig.axes:
        if a.get_legend() is not None:
            a.get_legend().remove()
    _finish_legend(fig, handles, labels, n_panels, title, excluded)


def _plottable(data: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    ok = data["status"].isin(["completed"]) if "status" in data else pd.Series(True, index=data.index)
    return data[ok], sorted(data.loc[~ok, "run"].astype(str).unique()) if "run" in data else []


def line_panels(
    data: pd.DataFrame,
    x: str | Sequence[str],
    y: str,
    hue: str,
    out: Path,
    title: str = "",
    facet: str | None = None,
    hue_order: Sequence[str] | None = None,
    facet_fmt: str = "{col} = {val}",
    ylim: Sequence[float] | None = None,
) -> Path:
    """Mean of ``y`` over seeds against each ``x`` (one panel per x column and per ``facet``
    value), 95% bootstrap CI bands, one shared legend below; writes PNG and PDF. ``ylim``
    (low, high) zooms every panel to the same y range."""
    import seaborn as sns

    plt = pyplot()
    xs = [x] if isinstance(x, str) else list(x)
    data, excluded = _plottable(data)
    hue_order = [h for h in (hue_order or sorted(data[hue].unique())) if h in set(data[hue])]
    facets = [None] if facet is None else sorted(data[facet].dropna().unique())
    panels = [(xc, fv) for fv in facets for xc in xs]
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n + 0.6 if n > 1 else 7.0, 4.6), squeeze=False, sharey=len(xs) == 1)
    pal, dashes = _styles(data, hue, hue_order)
    for ax, (xc, fv) in zip(axes[0], panels):
        d = data if fv is None else data[data[facet] == fv]
        d = d[d[xc].notna() & d[y].notna()].copy()
        if xc != "iter" and "iter" in d:  # align seeds on the mean x of each (curve, iteration)
            d[xc] = d.groupby([hue, "iter"])[xc].transform("mean")
        if xc == "bits_up":
            d = d[d[xc] > 0]
        if y == "opt_gap":  # float32 rounding can give F − F* ≤ 0 at convergence: show it at the floor
            d[y] = d[y].clip(lower=GAP_FLOOR)
        sns.lineplot(
            data=d,
            x=xc,
            y=y,
            hue=hue,
            style=hue,
            hue_order=hue_order,
            style_order=hue_order,
            palette=pal,
            dashes=dashes,
            errorbar=("ci", 95),
            n_boot=300,
            seed=0,
            ax=ax,
            linewidth=1.6,
        )
        if xc in LOG_COLUMNS or (xc != "iter" and _spans_decades(d[xc])):
            ax.set_xscale("log")
        if y in LOG_COLUMNS and len(d) and (d[y] > 0).all():
            ax.set_yscale("log")
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.set_xlabel(label(xc))
        ax.set_ylabel(label(y))
        if fv is not None:
            ax.set_title(facet_fmt.format(col=facet, val=_fmt_val(fv)), fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
    _finish(fig, axes[0][0], len(hue_order), n, title, excluded)
    return save_figure(fig, out)


def _fmt_val(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def final_figure(
    data: pd.DataFrame,
    x: str,
    y: str,
    hue: str,
    out: Path,
    title: str = "",
    facet: str | None = None,
    hue_order: Sequence[str] | None = None,
    x_order: Sequence[str] | None = None,
) -> Path:
    """Final value of ``y`` (last evaluated iteration, mean over seeds, 95% CI) against a swept
    key ``x``, one line per ``hue``; writes PNG and PDF. A non-numeric ``x`` (e.g. ``code``) is
    drawn at positions 0, 1, … in ``x_order`` (default: sorted), as markers only: a line would run
    through the categories where an arm has no value (diverged) as if it had one."""
    import seaborn as sns

    plt = pyplot()
    data, excluded = _plottable(data)
    fin = final_rows(data)
    fin = fin[fin[x].notna() & fin[y].notna()]
    hue_order = [h for h in (hue_order or sorted(fin[hue].unique())) if h in set(fin[hue])]
    facets = [None] if facet is None else sorted(fin[facet].dropna().unique())
    n = len(facets)
    fig, axes = plt.subplots(1, n, figsize=(4.8 * n + 0.6 if n > 1 else 7.0, 4.6), squeeze=False)
    pal, dashes = _styles(fin, hue, hue_order)
    arm_markers = {h: marker_for(*_arm(fin, hue, h)) for h in hue_order}
    # the same method twice: let seaborn pick distinct markers
    markers: dict[str, str] | bool = arm_markers if len(set(arm_markers.values())) == len(arm_markers) else True
    for ax, fv in zip(axes[0], facets):
        d = fin if fv is None else fin[fin[facet] == fv]
        cats = (
            None
            if pd.to_numeric(d[x], errors="coerce").notna().all()
            else [c for c in (x_order or sorted(d[x].astype(str).unique())) if c in set(d[x].astype(str))]
        )
        d = d.assign(**{x: pd.to_numeric(d[x]) if cats is None else d[x].astype(str).map(cats.index)})
        if y == "opt_gap":
            d = d.assign(opt_gap=d["opt_gap"].clip(lower=GAP_FLOOR))
        sns.lineplot(
            data=d,
            x=x,
            y=y,
            hue=hue,
            style=hue,
            hue_order=hue_order,
            style_order=hue_order,
            palette=pal,
            dashes=dashes,
            markers=markers,
            markersize=7,
            errorbar=("ci", 95),
            n_boot=300,
            seed=0,
            err_style="bars",
            err_kws={"capsize": 3},
            ax=ax,
            linewidth=1.6 if cats is None else 0,  # categories (codes): no line through a missing one
        )
        vals = sorted(d[x].unique())
        if cats is None and _spans_decades(d[x]):
            ax.set_xscale("log")
        ax.set_xticks(vals)
        ticks = [_fmt_val(float(v)) if cats is None else cats[int(v)] for v in vals]
        crowded = cats is not None and sum(len(t) for t in ticks) > 40  # long category names: slant them
        ax.set_xticklabels(ticks, rotation=25 if crowded else 0, ha="right" if crowded else "center")
        if ax.get_xscale() == "log":
            ax.minorticks_off()
        if y in LOG_COLUMNS and len(d) and (d[y] > 0).all():
            ax.set_yscale("log")
        ax.set_xlabel(label(x))
        ax.set_ylabel(f"final {label(y)}")
        if fv is not None:
            ax.set_title(f"{facet} = {_fmt_val(fv)}", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
    _finish(fig, axes[0][0], len(hue_order), n, title, excluded)
    return save_figure(fig, out)


def line_figure(data: pd.DataFrame, x: str, y: str, hue: str, out: Path, title: str = "") -> Path:
    """One panel of :func:`line_panels` (kept for the demo; rows without ``status`` all plot)."""
    return line_panels(data, x, y, hue, out, title=title)


# ------------------------------------------------------------------------------------- tables
def bits_to_target(rows: pd.DataFrame, hue: str, y: str, target: float, mode: str = "min") -> pd.DataFrame:
    """Per curve: cumulative bits (and iterations) when ``y`` first reaches ``target`` (≤ for
    mode min, ≥ for max), mean over seeds; "not reached" unless every seed reaches it."""
    out = []
    rows, _ = _plottable(rows)
    for h, g in rows.groupby(hue, sort=False):
        per_seed = []
        for _, s in g.sort_values("iter").groupby("seed"):
            hit = s[s[y] <= target] if mode == "min" else s[s[y] >= target]
            per_seed.append((hit["bits_up"].iloc[0], hit["iter"].iloc[0]) if len(hit) else None)
        fin = final_rows(g)[y].mean()
        reached = all(v is not None for v in per_seed)
        out.append(
            {
                hue: h,
                "method": g["method"].iloc[0],
                "compressor": g["compressor"].iloc[0],
                "seeds_reached": f"{sum(v is not None for v in per_seed)}/{len(per_seed)}",
                "bits_to_target": float(pd.Series([v[0] for v in per_seed if v is not None]).mean())
                if reached
                else math.nan,
                "iters_to_target": float(pd.Series([v[1] for v in per_seed if v is not None]).mean())
                if reached
                else math.nan,
                f"final_{y}": fin,
            }
        )
    return pd.DataFrame(out)


def markdown_table(df: pd.DataFrame, floatfmt: str = ".3g") -> str:
    """A GitHub markdown table (no tabulate dependency)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "–" if v != v else format(v, floatfmt)
        return str(v).replace("|", "\\|")

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


# ------------------------------------------------------------------------------------- curves
# Config keys that cannot change a run's numbers: runs differing only in them are seeds of one curve.
NOT_CONFIG = ("seed", "seeds", "checkpoint_every")
NOT_CONFIG_PREFIXES = ("hydra.", "logger.")
RUN_INFO = ("run", "status", "wall_s", "diverged")
# key order for the curve dimensions: method and compressor first (the primary label), then the groups
PRIMARY = ("method.name", "compressor.name")
GROUP_KEYS = ("code.name", "straggler.name", "dataset.name", "model.name", "optim.name", "runtime.name")
# readable names of options and keys (legends, titles), shared with `cocoef figures`' axis labels
NAMES = {
    "coco_ef": "COCO-EF",
    "coco": "COCO (no EF)",
    "coco_diana": "COCO-DIANA",
    "coco_ef21": "COCO-EF21",
    "gc": "GC",
    "ef_sgd": "EF-SGD",
    "ignore_stragglers": "ignore stragglers",
    "gd": "GD",
    "topk": "top-k",
    "randk": "rand-k",
    "randk_unbiased": "unbiased rand-k",
    "sign": "sign",
    "scaled_sign": "scaled sign",
    "grouped_sign": "grouped sign",
    "qsgd": "QSGD",
    "onebit": "unbiased 1-bit",
    "terngrad": "TernGrad",
    "natural": "natural",
    "identity": "full precision",
}
SHORT = {
    "straggler.p": "p",
    "code.d": "d",
    "compressor.ratio": "k/D",
    "compressor.k": "k",
    "optim.lr": "η",
    "devices": "M",
    "iters": "T",
    "batch_size": "b",
    "compressor.group": "group",
    "compressor.levels": "s",
    "straggler.s": "s",
    "straggler.deadline": "deadline",
    "optim.momentum": "momentum",
}
# metrics identity columns → config keys, for runs without a run.json
_FROM_METRICS = {
    "method": "method.name",
    "compressor": "compressor.name",
    "code": "code.name",
    "straggler": "straggler.name",
    "dataset": "dataset.name",
    "model": "model.name",
    "devices": "devices",
    "d": "code.d",
    "p": "straggler.p",
}
SLOTS = ("hue", "style", "col", "row")


def _value(v: Any) -> str:
    """A config value as the text curves are keyed and labelled by."""
    if v is None or (isinstance(v, float) and v != v):
        return "null"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def config_keys(runs: pd.DataFrame) -> list[str]:
    """The flattened config keys that identify a configuration (every key but :data:`NOT_CONFIG`)."""
    return [
        c for c in runs.columns if c not in RUN_INFO and c not in NOT_CONFIG and not c.startswith(NOT_CONFIG_PREFIXES)
    ]


def varying_keys(runs: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    """The keys of ``keys`` that take more than one value across ``runs``, primary keys first."""
    vary = [k for k in keys if runs[k].map(_value).nunique() > 1]
    rank = {k: i for i, k in enumerate((*PRIMARY, *GROUP_KEYS))}
    return sorted(vary, key=lambda k: (rank.get(k, len(rank)), k))


def _distinct(runs: pd.DataFrame, keys: Sequence[str]) -> int:
    return len(runs[list(keys)].map(_value).drop_duplicates()) if keys else 1


def curve_dimensions(runs: pd.DataFrame, vary: Sequence[str]) -> list[str]:
    """The fewest varying keys (greedy, in ``vary``'s order) whose values tell every configuration
    apart: a key that only follows another (``method.alpha`` with ``method.name``) adds nothing."""
    dims: list[str] = []
    for k in vary:
        if _distinct(runs, [*dims, k]) > _distinct(runs, dims):
            dims.append(k)
    return dims


def _resolve_key(key: str, keys: Sequence[str], vary: Sequence[str], opt: str) -> str:
    """A user's key: a config key, or a group name for its option (``method`` = ``method.name``)."""
    if key in keys:
        return key
    if f"{key}.name" in keys:
        return f"{key}.name"
    import difflib

    close = difflib.get_close_matches(key, [*vary, *keys], n=1)
    raise ConfigError(
        opt,
        key,
        list(vary) or list(keys),
        "not a config key of these runs" + (f" (did you mean {close[0]}?)" if close else ""),
    )


def assign_slots(
    runs: pd.DataFrame, vary: Sequence[str], keys: Sequence[str], chosen: dict[str, list[str]]
) -> dict[str, list[str]]:
    """Keys per slot (hue, style, col, row). ``chosen``: the user's keys per slot; the other
    curve dimensions fill the free slots in order (method and compressor share the hue). Raises
    ConfigError (exit 2) when the keys cannot tell every configuration apart: a figure never
    averages over configurations that differ."""
    slots = {s: [_resolve_key(k, keys, vary, f"--{s}") for k in chosen.get(s) or []] for s in SLOTS}
    shown = [k for ks in slots.values() for k in ks]
    left = [k for k in curve_dimensions(runs, vary) if _distinct(runs, [*shown, k]) > _distinct(runs, shown)]
    if not slots["hue"] and left:
        primary = [k for k in left if k in PRIMARY]
        slots["hue"] = primary or left[:1]
        left = [k for k in left if k not in slots["hue"]]
    for s in SLOTS[1:]:
        if not slots[s] and left:
            slots[s] = [left.pop(0)]
    shown = [k for ks in slots.values() for k in ks]
    if left or _distinct(runs, shown) < _distinct(runs, vary):
        hidden = [k for k in vary if k not in shown]
        raise ConfigError(
            "report",
            f"{_distinct(runs, vary)} configurations",
            "--hue KEY[,KEY...], --style KEY, "
            "--col KEY, --row KEY for the keys that vary, or --where KEY=VALUE to select runs",
            f"more keys vary than the figure can show: {', '.join(vary)} (not shown: {', '.join(hidden)})",
        )
    return slots


def value_label(key: str, v: Any) -> str:
    text = _value(v)
    if key in PRIMARY or key in GROUP_KEYS:
        return NAMES.get(text, text)
    return f"{SHORT.get(key, key)}={text}"


def slot_label(row: Any, keys: Sequence[str]) -> str:
    return ", ".join(value_label(k, row[k]) for k in keys)


def setting_title(runs: pd.DataFrame, rows: pd.DataFrame) -> str:
    """The setting every run shares, e.g. "M=100, sgc d=3, p=0.2, top-k 1%, mnist5k/mlp"."""

    def const(k: str) -> Any:
        if k in runs and runs[k].map(_value).nunique() == 1:
            return runs[k].iloc[0]
        return None

    parts = []
    if const("method.name") is not None:
        parts.append(NAMES.get(str(const("method.name")), str(const("method.name"))))
    if const("devices") is not None:
        parts.append(f"M={_value(const('devices'))}")
    if const("code.name") is not None:
        parts.append(str(const("code.name")) + (f" d={_value(const('code.d'))}" if const("code.d") is not None else ""))
    if "p" in rows and rows["p"].nunique() == 1:
        parts.append(f"p={rows['p'].iloc[0]:.3g}")
    comp = const("compressor.name")
    if comp is not None:
        text = NAMES.get(str(comp), str(comp))
        ratio, k = const("compressor.ratio"), const("compressor.k")
        if str(comp) in ("topk", "randk", "randk_unbiased"):
            text += (
                f" k={_value(k)}"
                if k is not None and _value(k) != "null"
                else f" {float(ratio) * 100:g}%"
                if ratio is not None
                else ""
            )
        parts.append(text)
    if const("dataset.name") is not None and const("model.name") is not None:
        parts.append(f"{const('dataset.name')}/{const('model.name')}")
    return ", ".join(parts)


def t_half_width(std: pd.Series, n: pd.Series) -> pd.Series:
    """Half-width of the 95% Student-t interval of a mean over n seeds: t₀.₉₇₅,ₙ₋₁ · s/√n (NaN for n = 1)."""
    from scipy.stats import t

    n = n.astype(float)
    half = pd.Series(t.ppf(0.975, (n - 1).clip(lower=1)), index=n.index) * std / n.pow(0.5)
    return half.where(n > 1)


def curve_stats(rows: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Per curve and evaluated iteration: the mean x over seeds (x = iter, bits_up, ...), the mean
    of y over the seeds of that configuration, its 95% t-interval (``lo``, ``hi``) and ``seeds``."""
    d = rows[rows[y].notna() & rows[x].notna()]
    g = d.groupby(["curve_id", "iter"], sort=True)
    out = g.agg(x=(x, "mean"), mean=(y, "mean"), std=(y, "std"), seeds=(y, "size")).reset_index()
    half = t_half_width(out["std"], out["seeds"])
    return out.assign(lo=out["mean"] - half, hi=out["mean"] + half).drop(columns="std")


_DASHES = ["", (5, 2), (1.5, 1.5), (6, 2, 1, 2), (8, 2), (3, 1, 1, 1, 1, 1), (1, 3), (4, 1, 4, 3)]


def _curve_styles(curves: pd.DataFrame, slots: dict[str, list[str]]) -> tuple[dict, dict]:
    """Colour per hue label and dashes per curve: the fixed method/compressor styles when the hue
    is method/compressor and they are distinct; a palette otherwise."""
    import seaborn as sns

    hues = list(dict.fromkeys(curves["hue"]))
    arms = {
        h: (
            str(curves.loc[curves["hue"] == h, "method"].iloc[0]),
            str(curves.loc[curves["hue"] == h, "compressor"].iloc[0]),
        )
        for h in hues
    }
    colour = {h: style_for(*arms[h])[0] for h in hues}
    if len(set(colour.values())) < len(colour) or not set(slots["hue"]) <= set(PRIMARY):
        colour = dict(zip(hues, sns.color_palette("tab10" if len(hues) <= 10 else "tab20", len(hues))))
    styles = list(dict.fromkeys(curves["style"]))
    if slots["style"]:
        dash = {c.curve_id: _DASHES[styles.index(c.style) % len(_DASHES)] for c in curves.itertuples()}
    else:
        dash = {c.curve_id: style_for(*arms[c.hue])[1] for c in curves.itertuples()}
    return colour, dash


def curve_grid(
    stats: pd.DataFrame,
    curves: pd.DataFrame,
    slots: dict[str, list[str]],
    x: str,
    y: str,
    out: Path,
    title: str,
    excluded: Sequence[str],
) -> Path:
    """One panel per (row, col) facet value, one line per curve (colour = hue, dashes = style),
    mean over seeds with its 95% band, y shared across the panels; PNG + PDF."""
    plt = pyplot()
    rows_v = list(dict.fromkeys(curves["row"])) if slots["row"] else [""]
    cols_v = list(dict.fromkeys(curves["col"])) if slots["col"] else [""]
    nr, nc = len(rows_v), len(cols_v)
    fig, axes = plt.subplots(
        nr,
        nc,
        figsize=(4.6 * nc + 0.6 if nc > 1 else 7.0, 4.2 * nr + 0.4),
        squeeze=False,
        sharey=True,
        sharex=x == "iter",
    )
    colour, dash = _curve_styles(curves, slots)
    stats = stats.copy()
    if y == "opt_gap":  # float32 rounding can give F − F* ≤ 0 at convergence: show it at the floor
        stats[["mean", "lo", "hi"]] = stats[["mean", "lo", "hi"]].clip(lower=GAP_FLOOR)
    if x == "bits_up":
        stats = stats[stats["x"] > 0]
    positive = bool(len(stats)) and bool((stats["mean"] > 0).all())
    for i, rv in enumerate(rows_v):
        for j, cv in enumerate(cols_v):
            ax = axes[i][j]
            here = curves[(curves["row"] == rv) & (curves["col"] == cv)] if (slots["row"] or slots["col"]) else curves
            for c in here.itertuples():
                st = stats[stats["curve_id"] == c.curve_id]
                (line,) = ax.plot(st["x"], st["mean"], color=colour[c.hue], linewidth=1.6, label=c.legend)
                if dash[c.curve_id]:
                    line.set_dashes(dash[c.curve_id])
                ax.fill_between(st["x"], st["lo"], st["hi"], color=colour[c.hue], alpha=0.18, linewidth=0)
            if x in LOG_COLUMNS or (x != "iter" and _spans_decades(stats["x"])):
                ax.set_xscale("log")
            if y in LOG_COLUMNS and positive:
                ax.set_yscale("log")
            ax.set_xlabel(label(x))
            ax.set_ylabel(label(y) if j == 0 else "")
            facet = " | ".join(t for t in (rv, cv) if t)
            if facet:
                ax.set_title(facet, fontsize=10)
            ax.grid(True, which="major", alpha=0.3)
    handles, labels_ = [], []
    for a in fig.axes:  # one legend entry per curve label, from every panel
        for h, lab in zip(*a.get_legend_handles_labels()):
            if lab not in labels_:
                handles.append(h)
                labels_.append(lab)
    _finish_legend(fig, handles, labels_, nc, title, excluded)
    return save_figure(fig, out)


def _finish_legend(fig: Any, handles: list, labels_: list, n_panels: int, title: str, excluded: Sequence[str]) -> None:
    """Title, layout, one shared legend below the panels (the saved canvas grows to fit it:
    ``bbox_inches="tight"``) and a note naming the runs that were not plotted."""
    if title:
        fig.suptitle(title, fontsize=10.5)
    fig.tight_layout()
    n = len(labels_)
    ncol = max(1, min(n, 4 if n_panels > 2 else 2))
    y0 = 0.0
    if handles:
        fig.legend(
            handles,
            labels_,
            loc="upper center",
            ncol=ncol,
            fontsize=9,
            frameon=False,
            handlelength=3.4,
            bbox_to_anchor=(0.5, 0.0),
        )
        y0 = -0.055 * math.ceil(n / ncol) - 0.02
    if excluded:
        text = "not plotted (diverged or failed): " + "; ".join(excluded)
        fig.text(
            0.5,
            y0 - 0.02,
            text[:160] + ("…" if len(text) > 160 else ""),
            fontsize=7.5,
            color="#a00",
            ha="center",
            va="top",
        )


def _ci_text(m: float, h: float) -> str:
    if m != m:
        return "–"
    return f"{m:.4g}" if h != h else f"{m:.4g} ± {h:.2g}"


# ------------------------------------------------------------------------------------- report
def _nonempty(rows: pd.DataFrame, col: str) -> bool:
    return col in rows and rows[col].notna().any()


def _where(runs: pd.DataFrame, keys: Sequence[str], where: Sequence[str]) -> pd.DataFrame:
    """The runs whose config matches every ``KEY=VALUE`` (numbers compared as numbers)."""
    for cond in where:
        key, eq, want = cond.partition("=")
        if not eq:
            raise ConfigError("--where", cond, "KEY=VALUE, e.g. --where compressor.ratio=0.05", "not KEY=VALUE")
        key = _resolve_key(key.strip(), keys, keys, "--where")
        vals = runs[key].map(_value)
        try:
            hit = pd.to_numeric(runs[key], errors="coerce") == float(want)
        except ValueError:
            hit = pd.Series(False, index=runs.index)
        sel = runs[(vals == want.strip()) | hit]
        if sel.empty:
            raise ConfigError("--where", cond, sorted(set(vals)), f"no run has {key}={want}")
        runs = sel
    return runs


def report(
    runs_dir: Path,
    out: Path | None = None,
    x: str | None = None,
    y: str | None = None,
    hue: str | Sequence[str] | None = None,
    style: str | None = None,
    col: str | None = None,
    row: str | None = None,
    where: Sequence[str] = (),
    title: str | None = None,
) -> list[Path]:
    """Figures (PNG + PDF), ``summary.csv``/``summary.md`` and ``curves.csv`` for the runs under
    ``runs_dir`` (``cocoef report``).

    One curve = one configuration: the runs (and their seeds) whose configs agree on every key but
    :data:`NOT_CONFIG`. The keys that vary across the runs are shown: method/compressor as the
    hue, the others as style, column and row facets (or as the user assigns them); when more vary
    than a figure can show, ConfigError (exit 2) names them. Defaults: y = ``opt_gap`` if
    present, else ``test_acc``, else ``train_loss``; one figure per x in (``iter``, ``bits_up``,
    ``sim_time``) that has values. Bands: 95% Student-t intervals over the seeds of a curve
    (``curves.csv`` holds every plotted point). Diverged and failed runs are listed, never drawn."""
    runs_dir = Path(runs_dir)
    rows, runs = load_runs(runs_dir)
    out = Path(out) if out else runs_dir / "report"
    if rows.empty:
        raise ConfigError("RUNS_DIR", str(runs_dir), "run folders with a metrics.csv", "no metrics found")
    columns = [c for c in rows.columns if c not in ("run", "status") and rows[c].notna().any()]
    for opt, val in (("--x", x), ("--y", y)):
        if val is not None and val not in columns:
            raise ConfigError(opt, val, columns, "unknown column")
    firsts = rows.groupby("run").first()
    for mcol, key in _FROM_METRICS.items():  # runs without a run.json: their identity columns
        if mcol in firsts:
            fill = runs["run"].map(firsts[mcol])
            runs[key] = runs[key].fillna(fill) if key in runs else fill
    keys = config_keys(runs)
    runs = _where(runs, keys, where)
    bad = runs[runs["status"] != "completed"]
    ok = runs[runs["status"] == "completed"].copy()
    if ok.empty:
        raise ConfigError("RUNS_DIR", str(runs_dir), "at least one completed run", "every run diverged or failed")
    vary = varying_keys(ok, keys)
    chosen = {
        "hue": [
            h.strip()
            for h in (hue.split(",") if isinstance(hue, str) else hue or [])
            if h.strip() and h.strip() != "label"
        ],
        "style": [style] if style else [],
        "col": [col] if col else [],
        "row": [row] if row else [],
    }
    slots = assign_slots(ok, vary, keys, chosen)
    ok["curve_id"] = ok[vary].map(_value).agg("\x1f".join, axis=1) if vary else ""
    for s in SLOTS:
        ok[s] = ok.apply(lambda r, ks=slots[s]: slot_label(r, ks), axis=1) if slots[s] else ""
    if not slots["hue"]:  # one curve: its method and compressor
        ok["hue"] = ok.apply(lambda r: slot_label(r, [k for k in PRIMARY if k in ok]), axis=1)
    ok["legend"] = ok.apply(lambda r: ", ".join(t for t in (r["hue"], r["style"]) if t), axis=1)
    ok["method"] = ok["method.name"].astype(str) if "method.name" in ok else ok["run"].map(firsts["method"])
    ok["compressor"] = (
        ok["compressor.name"].astype(str)
        if "compressor.name" in ok
        else ok["run"].map(firsts["compressor"])
        if "compressor" in firsts
        else "*"
    )
    curve_cols = ["curve_id", "legend", *SLOTS, "method", "compressor"]
    data = rows.merge(ok[["run", *curve_cols]], on="run", how="inner")
    data = data.drop_duplicates(["curve_id", "seed", "iter"])  # one replicate counted once per curve
    curves = ok.drop_duplicates("curve_id")[[*curve_cols, *vary]]
    order = sorted(
        range(len(curves)), key=lambda i: tuple(str(curves.iloc[i][s]) for s in ("row", "col", "hue", "style"))
    )
    curves = curves.iloc[order].reset_index(drop=True)
    excluded = [f"{r.run}: {r.status}" for r in bad.itertuples()]
    setting = setting_title(ok, rows[rows["run"].isin(ok["run"])])
    fig_title = (
        title
        if title is not None
        else (f"{setting} — mean over seeds, 95% CI" if setting else f"{runs_dir.name}: mean over seeds, 95% CI")
    )
    ys = [y] if y else [next(c for c in ("opt_gap", "test_acc", "train_loss") if _nonempty(data, c))]
    xs = [x] if x else [c for c in ("iter", "bits_up", "sim_time") if _nonempty(data, c)]
    files, points = [], []
    for yc in ys:
        for xc in xs:
            st = curve_stats(data, xc, yc)
            p = curve_grid(st, curves, slots, xc, yc, out / f"{yc}_vs_{xc}.png", fig_title, excluded)
            files += [p, p.with_suffix(".pdf")]
            points.append(st.assign(figure=p.stem, x_col=xc, y_col=yc))
    # per curve: the final values (last evaluated iteration of each seed), mean and 95% CI over seeds
    fin = data[data["iter"] == data.groupby(["curve_id", "seed"])["iter"].transform("max")]
    metrics = [c for c in METRICS if _nonempty(fin, c)]
    g = fin.groupby("curve_id")
    table = curves[["curve_id", "legend", *vary]].rename(columns={"legend": "curve"}).set_index("curve_id")
    table["seeds"] = g["seed"].nunique()
    table["runs"] = data.groupby("curve_id")["run"].nunique()
    table["iter"] = g["iter"].max()
    for m in metrics:
        table[f"{m}_mean"] = g[m].mean()
        table[f"{m}_ci95"] = t_half_width(g[m].std(), g[m].count())
    table = table.reset_index(drop=True)
    for k in vary:
        table[k] = table[k].map(_value)
    out.mkdir(parents=True, exist_ok=True)
    pts = pd.concat(points, ignore_index=True).merge(curves[["curve_id", "legend", *vary]], on="curve_id")
    pts = pts.rename(columns={"legend": "curve"})[
        ["figure", "curve", *vary, "x_col", "y_col", "iter", "x", "mean", "lo", "hi", "seeds"]
    ]
    md_table = table[["curve", *vary, "seeds"]].copy()
    for m in metrics:
        md_table[m] = [_ci_text(a, b) for a, b in zip(table[f"{m}_mean"], table[f"{m}_ci95"])]
    shown_txt = "; ".join(f"{s}: {', '.join(slots[s])}" for s in SLOTS if slots[s]) or "one configuration"
    lines = [
        f"# Report: `{runs_dir}`",
        "",
        f"{len(runs)} run(s), {len(ok)} completed, {len(curves)} curve(s) (one per configuration; {shown_txt})."
        + (f" Setting: {setting}." if setting else ""),
        "",
        "Final values (last evaluated iteration), mean ± 95% CI (Student t) over the seeds of each curve.",
        "",
        markdown_table(md_table),
        "",
    ]
    if len(bad):
        lines += ["## Not plotted (diverged or failed)", ""]
        for r in bad.itertuples():
            detail = f" (seed: update {r.diverged})" if isinstance(r.diverged, dict) and r.diverged else ""
            lines.append(f"- `{r.run}`: {r.status}{detail}")
        lines.append("")
    lines += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in files if p.suffix == ".png"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    table.to_csv(out / "summary.csv", index=False)
    pts.to_csv(out / "curves.csv", index=False)
    return files + [out / "summary.md", out / "summary.csv", out / "curves.csv"]
