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
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from cocoef_cli.errors import ConfigError
from cocoef_cli.record import read_record

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
IDENTITY = ("method", "compressor", "code", "d", "p", "straggler", "dataset", "model", "devices")
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
    ("coco_ef", "topk"): "o", ("coco_ef", "grouped_sign"): "X", ("coco_ef", "*"): "P",
    ("coco", "topk"): "s", ("coco", "grouped_sign"): "D", ("coco", "randk_unbiased"): "^",
    ("coco", "qsgd"): "v", ("coco", "onebit"): "<", ("coco", "*"): ">",
    ("coco_diana", "*"): "p", ("coco_ef21", "*"): "h", ("ef_sgd", "*"): "*",
    ("gc", "*"): "d", ("ignore_stragglers", "*"): "8", ("gd", "*"): "H",
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
def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(d, (list, tuple)):
        out[prefix[:-1]] = str(list(d))
    else:
        out[prefix[:-1]] = d
    return out


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
        cfg = {k: v for k, v in _flatten(rec.get("config", {})).items() if not k.startswith("hydra")}
        info = {"run": rel, "status": rec.get("status", "unknown"), "wall_s": rec.get("wall_s"),
                "diverged": rec.get("diverged"), **cfg}
        path = folder / "metrics.csv"
        if path.exists():
            if info["status"] == "unknown":
                info["status"] = "completed"
            df = pd.read_csv(path)
            extra = {k: v for k, v in cfg.items() if k not in df.columns}
            frames.append(df.assign(run=rel, status=info["status"], **extra))
        runs.append(info)
    if not runs:
        raise ConfigError("RUNS_DIR", str(root), "a run folder (metrics.csv, run.json) or a sweep/figures folder "
                          "holding run folders", "no runs found")
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return rows, pd.DataFrame(runs)


def final_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The last evaluated row of every (run, seed)."""
    last = rows.groupby(["run", "seed"])["iter"].transform("max")
    return rows[rows["iter"] == last]


def default_label(rows: pd.DataFrame) -> pd.Series:
    """A curve label from the identity columns (and the step size) that vary across runs."""
    keys = [c for c in (*IDENTITY, "optim.lr") if c in rows and rows[c].astype(str).nunique() > 1]
    if not keys:
        keys = [c for c in ("method", "compressor") if c in rows]
    first = {"method", "compressor"}
    return rows[keys].astype(str).apply(
        lambda r: ", ".join(v if k in first else f"{k}={v}" for k, v in r.items()), axis=1)


# ------------------------------------------------------------------------------------ drawing
def _plt():
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


def _save(fig: Any, out: Path, dpi: int = 110) -> Path:
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
    _plt().close(fig)
    return out


def _finish(fig: Any, ax: Any, n_items: int, n_panels: int, title: str, excluded: Sequence[str]) -> None:
    """Title, layout, then one shared legend below the panels (the saved canvas grows to fit it:
    ``bbox_inches="tight"``) and a note naming the runs that were not plotted."""
    handles, labels = ax.get_legend_handles_labels()
    for a in fig.axes:
        if a.get_legend() is not None:
            a.get_legend().remove()
    if title:
        fig.suptitle(title, fontsize=10.5)
    fig.tight_layout()
    ncol = max(1, min(n_items, 4 if n_panels > 2 else 2))  # never wider than the panels
    y = 0.0
    if handles:
        fig.legend(handles, labels, loc="upper center", ncol=ncol, fontsize=9, frameon=False, handlelength=3.4,
                   bbox_to_anchor=(0.5, 0.0))
        y = -0.055 * math.ceil(n_items / ncol) - 0.02
    if excluded:
        text = "not plotted (diverged or failed): " + "; ".join(excluded)
        fig.text(0.5, y - 0.02, text[:160] + ("…" if len(text) > 160 else ""), fontsize=7.5, color="#a00",
                 ha="center", va="top")


def _plottable(data: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    ok = data["status"].isin(["completed"]) if "status" in data else pd.Series(True, index=data.index)
    return data[ok], sorted(data.loc[~ok, "run"].astype(str).unique()) if "run" in data else []


def line_panels(data: pd.DataFrame, x: str | Sequence[str], y: str, hue: str, out: Path, title: str = "",
                facet: str | None = None, hue_order: Sequence[str] | None = None,
                facet_fmt: str = "{col} = {val}", ylim: Sequence[float] | None = None) -> Path:
    """Mean of ``y`` over seeds against each ``x`` (one panel per x column and per ``facet``
    value), 95% bootstrap CI bands, one shared legend below; writes PNG and PDF. ``ylim``
    (low, high) zooms every panel to the same y range."""
    import seaborn as sns

    plt = _plt()
    xs = [x] if isinstance(x, str) else list(x)
    data, excluded = _plottable(data)
    hue_order = [h for h in (hue_order or sorted(data[hue].unique())) if h in set(data[hue])]
    facets = [None] if facet is None else sorted(data[facet].dropna().unique())
    panels = [(xc, fv) for fv in facets for xc in xs]
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n + 0.6 if n > 1 else 7.0, 4.6), squeeze=False,
                             sharey=len(xs) == 1)
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
        sns.lineplot(data=d, x=xc, y=y, hue=hue, style=hue, hue_order=hue_order, style_order=hue_order,
                     palette=pal, dashes=dashes, errorbar=("ci", 95), n_boot=300, seed=0, ax=ax, linewidth=1.6)
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
    return _save(fig, out)


def _fmt_val(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def final_figure(data: pd.DataFrame, x: str, y: str, hue: str, out: Path, title: str = "",
                 facet: str | None = None, hue_order: Sequence[str] | None = None,
                 x_order: Sequence[str] | None = None) -> Path:
    """Final value of ``y`` (last evaluated iteration, mean over seeds, 95% CI) against a swept
    key ``x``, one line per ``hue``; writes PNG and PDF. A non-numeric ``x`` (e.g. ``code``) is
    drawn at positions 0, 1, … in ``x_order`` (default: sorted)."""
    import seaborn as sns

    plt = _plt()
    data, excluded = _plottable(data)
    fin = final_rows(data)
    fin = fin[fin[x].notna() & fin[y].notna()]
    hue_order = [h for h in (hue_order or sorted(fin[hue].unique())) if h in set(fin[hue])]
    facets = [None] if facet is None else sorted(fin[facet].dropna().unique())
    n = len(facets)
    fig, axes = plt.subplots(1, n, figsize=(4.8 * n + 0.6 if n > 1 else 7.0, 4.6), squeeze=False)
    pal, dashes = _styles(fin, hue, hue_order)
    markers = {h: marker_for(*_arm(fin, hue, h)) for h in hue_order}
    if len(set(markers.values())) < len(markers):
        markers = True  # the same method twice: let seaborn pick distinct markers
    for ax, fv in zip(axes[0], facets):
        d = fin if fv is None else fin[fin[facet] == fv]
        cats = None if pd.to_numeric(d[x], errors="coerce").notna().all() else \
            [c for c in (x_order or sorted(d[x].astype(str).unique())) if c in set(d[x].astype(str))]
        d = d.assign(**{x: pd.to_numeric(d[x]) if cats is None else d[x].astype(str).map(cats.index)})
        if y == "opt_gap":
            d = d.assign(opt_gap=d["opt_gap"].clip(lower=GAP_FLOOR))
        sns.lineplot(data=d, x=x, y=y, hue=hue, style=hue, hue_order=hue_order, style_order=hue_order,
                     palette=pal, dashes=dashes, markers=markers, markersize=7, errorbar=("ci", 95), n_boot=300,
                     seed=0, err_style="bars", err_kws={"capsize": 3}, ax=ax, linewidth=1.6)
        vals = sorted(d[x].unique())
        if cats is None and _spans_decades(d[x]):
            ax.set_xscale("log")
        ax.set_xticks(vals)
        ax.set_xticklabels([_fmt_val(float(v)) if cats is None else cats[int(v)] for v in vals])
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
    return _save(fig, out)


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
        out.append({hue: h, "method": g["method"].iloc[0], "compressor": g["compressor"].iloc[0],
                    "seeds_reached": f"{sum(v is not None for v in per_seed)}/{len(per_seed)}",
                    "bits_to_target": float(pd.Series([v[0] for v in per_seed]).mean()) if reached else math.nan,
                    "iters_to_target": float(pd.Series([v[1] for v in per_seed]).mean()) if reached else math.nan,
                    f"final_{y}": fin})
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


# ------------------------------------------------------------------------------------- report
def _nonempty(rows: pd.DataFrame, col: str) -> bool:
    return col in rows and rows[col].notna().any()


def report(runs_dir: Path, out: Path | None = None, x: str | None = None, y: str | None = None,
           hue: str | None = None) -> list[Path]:
    """Figures (PNG + PDF) and ``summary.md`` for every run under ``runs_dir`` (``cocoef report``).

    Defaults: y = ``opt_gap`` if present, else ``test_acc``, else ``train_loss``; one figure per
    x in (``iter``, ``bits_up``, ``sim_time``) that has values; hue = the identity columns that
    vary across runs. A column name that is not in the runs raises :class:`ConfigError`."""
    runs_dir = Path(runs_dir)
    rows, runs = load_runs(runs_dir)
    out = Path(out) if out else runs_dir / "report"
    if rows.empty:
        raise ConfigError("RUNS_DIR", str(runs_dir), "run folders with a metrics.csv", "no metrics found")
    columns = [c for c in rows.columns if c not in ("run", "status") and rows[c].notna().any()]
    for opt, val in (("--x", x), ("--y", y), ("--hue", hue)):
        if val is not None and val not in columns and not (opt == "--hue" and val == "label"):
            raise ConfigError(opt, val, columns, "unknown column")
    ys = [y] if y else [next(c for c in ("opt_gap", "test_acc", "train_loss") if _nonempty(rows, c))]
    xs = [x] if x else [c for c in ("iter", "bits_up", "sim_time") if _nonempty(rows, c)]
    if hue is None or hue == "label":
        rows["label"] = default_label(rows)
        hue = "label"
    else:
        rows[hue] = rows[hue].astype(str)
    files = []
    title = f"{runs_dir.name}: mean over seeds, 95% CI"
    for yc in ys:
        for xc in xs:
            p = line_panels(rows, xc, yc, hue, out / f"{yc}_vs_{xc}.png", title=title)
            files += [p, p.with_suffix(".pdf")]
    # summary: final values per run
    fin = final_rows(rows)
    keys = [c for c in ("method", "compressor", "code", "d", "p", "optim.lr") if c in fin]
    agg = {c: "mean" for c in METRICS if _nonempty(fin, c)}
    table = fin.groupby("run", sort=True).agg({**{k: "first" for k in keys}, **agg, "seed": "nunique"})
    table = table.rename(columns={"seed": "seeds"}).reset_index()
    table.insert(1, "status", table["run"].map(dict(zip(runs["run"], runs["status"]))))
    bad = runs[runs["status"] != "completed"]
    lines = [f"# Report: `{runs_dir}`", "",
             f"{len(runs)} run(s), {int((runs['status'] == 'completed').sum())} completed. Final values "
             f"(last evaluated iteration), mean over seeds.", "", markdown_table(table), ""]
    if len(bad):
        lines += ["## Not plotted (diverged or failed)", ""]
        for r in bad.itertuples():
            detail = f" (seed: iteration {r.diverged})" if isinstance(r.diverged, dict) and r.diverged else ""
            lines.append(f"- `{r.run}`: {r.status}{detail}")
        lines.append("")
    lines += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in files if p.suffix == ".png"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    table.to_csv(out / "summary.csv", index=False)
    return files + [out / "summary.md", out / "summary.csv"]
