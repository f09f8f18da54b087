"""Seaborn figures. Headless (Agg) so they render on servers and in CI.

Every figure is made at DPI (MLflow's log_figure and savefig both use the figure's own
dpi), with constrained layout and titles wrapped to the figure's width so no text is
cut off, and counts epochs from 1 with integer ticks (the MLflow metric steps and the
logged best_epoch count from 0)."""

from __future__ import annotations

import math
import textwrap

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.font_manager import FontProperties  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ..modes import BASELINE, DISTILLATION_MODES  # noqa: E402

DPI = 150


def _figure(figsize: tuple[float, float], ncols: int = 1, style: str = "whitegrid"):
    sns.set_theme(style=style, context="notebook")
    return plt.subplots(1, ncols, figsize=figsize, dpi=DPI, layout="constrained")


def _wrapped(text: str, width_inches: float, size_key: str) -> str:
    """``text`` broken at spaces into lines that fit ``width_inches`` at the font size
    rcParams[size_key] (about 0.6 em per character in DejaVu Sans)."""
    points = FontProperties(size=plt.rcParams[size_key]).get_size_in_points()
    chars = max(20, int(width_inches * 72 / (0.6 * points)))
    return "\n".join(textwrap.fill(line, chars, break_long_words=False) for line in text.split("\n"))


def _set_title(ax, text: str) -> None:
    ax.set_title(_wrapped(text, 0.9 * ax.figure.get_figwidth(), "axes.titlesize"))


def _epoch_axis(ax) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (from 1)")


def learning_curves(history: list[dict], title: str = "", *, teacher: str = "", teacher_acc: float | None = None,
                    best_epoch: int | None = None, test_acc: float | None = None):
    """Loss (left) and accuracy (right) per epoch, epochs counted from 1. Left: each
    ``loss_<term>`` as logged (already weighted; they sum to train_loss), train_loss,
    and val_loss (plain cross-entropy on the validation split). Right: train and val
    accuracy. Both mark the selected epoch, ``best_epoch`` (0-based like the metric
    steps; by default the first epoch with the best val_acc). The title gives the
    student's ``test_acc`` (the selected model's) and names the teacher (``teacher_acc``:
    the teacher's own test accuracy, if known)."""
    df = pd.DataFrame(history)
    epochs = np.arange(1, len(df) + 1)
    if best_epoch is None and "val_acc" in df and df["val_acc"].notna().any():
        best_epoch = int(df["val_acc"].idxmax())  # the first best, as the trainer selects
    fig, (ax_loss, ax_acc) = _figure((12, 5), ncols=2)

    terms = [c for c in df.columns if c.startswith("loss_")]
    if "train_loss" in df:
        # behind the terms, light: a term that is most of the loss (kd at alpha 0.9) would
        # otherwise hide under it
        what = "sum of the weighted terms" if len(terms) > 1 else (f"= {terms[0][5:]}" if terms else "")
        ax_loss.plot(epochs, df["train_loss"], lw=6, color="0.8", solid_capstyle="round", zorder=1,
                     label=f"train_loss ({what})" if what else "train_loss")
    if len(terms) > 1:
        markers = ["o", "^", "s", "D", "v", "P", "X"]
        for i, (term, color) in enumerate(zip(terms, sns.color_palette("deep", len(terms)))):
            ax_loss.plot(epochs, df[term], marker=markers[i % len(markers)], ms=5, lw=1.4, color=color, zorder=3,
                         label=f"{term[5:]} (weighted)")
    if "val_loss" in df:
        ax_loss.plot(epochs, df["val_loss"], marker="s", lw=2.0, ls="--", color="tab:red",
                     label="val_loss (unweighted CE, validation)")
    ax_loss.set_ylabel("loss")

    for col, style, color in (("train_acc", "-", "tab:blue"), ("val_acc", "--", "tab:orange")):
        if col in df:
            ax_acc.plot(epochs, df[col], marker="o", ls=style, lw=2.0, color=color, label=col)
    ax_acc.set_ylabel("accuracy (%)")

    if best_epoch is not None and 0 <= best_epoch < len(df):
        x = best_epoch + 1
        for ax in (ax_loss, ax_acc):
            ax.axvline(x, color="grey", ls=":", lw=1.5, zorder=0)
        if "val_acc" in df:
            ax_acc.plot([x], [df["val_acc"].iloc[best_epoch]], marker="*", ms=18, color="tab:green",
                        ls="none", zorder=5,
                        label=f"selected: epoch {x} of {len(df)} (val_acc {df['val_acc'].iloc[best_epoch]:.2f}%)")
    # Legends above the panels (as their headings): inside, they would hide a line.
    loss_heading = "loss terms (each already weighted; they sum to train_loss)" if len(terms) > 1 else "loss"
    for ax, heading in ((ax_loss, loss_heading), (ax_acc, "accuracy")):
        _epoch_axis(ax)
        ax.set_xlim(0.5, len(df) + 0.5)
        ax.legend(title=heading, loc="lower center", bbox_to_anchor=(0.5, 1.01), ncol=2, fontsize=8,
                  title_fontsize=10, frameon=False)

    heading = title
    if test_acc is not None:
        heading += f"{': ' if heading else ''}student test_acc {float(test_acc):.2f}%"
    if teacher:
        known = teacher_acc is not None and not math.isnan(float(teacher_acc))
        heading += f"{'; ' if heading else ''}teacher {teacher}" + (
            f" (the teacher's own test_acc {float(teacher_acc):.2f}%)" if known else "")
    if heading:
        fig.suptitle(_wrapped(heading, 0.95 * fig.get_figwidth(), "figure.titlesize"))
    return fig


# ------------------------------------------------------ multi-stage strategies
def teacher_vs_student(rows: list[dict], title: str = ""):
    """allkd: each student's test accuracy against its teacher's, one numbered point
    per pair (does a better teacher make a better student?), the legend naming each
    teacher and its student's best val_acc. The selected student (best validation
    accuracy) is drawn as a large star."""
    df = pd.DataFrame(rows).reset_index(drop=True)
    df["teacher_test_acc"] = pd.to_numeric(df["teacher_test_acc"], errors="coerce")
    selected = df["selected"].fillna(False).astype(bool) if "selected" in df else pd.Series(False, index=df.index)
    fig, ax = _figure((10, 5.5))
    known = df.dropna(subset=["teacher_test_acc"])
    colors = sns.color_palette("deep", len(df))
    for i, row in known.iterrows():
        spec = row["teacher_spec"] if row["teacher_spec"].startswith("models:/") else \
            row["teacher_spec"].rsplit("/", 1)[-1]
        number = row.get("index", i + 1)
        star = bool(selected[i])
        ax.scatter(row["teacher_test_acc"], row["student_test_acc"], marker="*" if star else "o",
                   s=450 if star else 150, color=colors[i], edgecolor="black", linewidth=0.6, zorder=3,
                   label=f"{number}: {spec} (student val {row['student_best_val_acc']:.1f})"
                         + (" - selected" if star else ""))
        ax.annotate(str(number), (row["teacher_test_acc"], row["student_test_acc"]), textcoords="offset points",
                    xytext=(9, 7), fontsize=9, weight="bold")
    if len(known):
        lo = min(known["teacher_test_acc"].min(), known["student_test_acc"].min())
        hi = max(known["teacher_test_acc"].max(), known["student_test_acc"].max())
        pad = max(1.0, 0.05 * (hi - lo))
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], ls="--", c="grey", lw=1, label="student = teacher")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), title="teacher (star: selected)",
                  title_fontsize=9)
    missing = df[df["teacher_test_acc"].isna()]
    if len(missing):
        ax.text(0.01, 0.01, "teacher accuracy unknown: " + ", ".join(missing["teacher_spec"]),
                transform=ax.transAxes, fontsize=8, color="grey")
    ax.set_xlabel("teacher test accuracy (%)")
    ax.set_ylabel("student test accuracy (%)")
    _set_title(ax, title or "teacher vs student")
    return fig


def kdparam_heatmap(rows: list[dict], title: str = ""):
    """kdparam: best validation accuracy of each (temperature, alpha) cell, annotated;
    the selected cell is outlined."""
    from matplotlib.patches import Rectangle

    df = pd.DataFrame(rows)
    grid = df.pivot(index="temperature", columns="alpha", values="best_val_acc")
    grid.index = [f"{t:g}" for t in grid.index]
    grid.columns = [f"{a:g}" for a in grid.columns]
    fig, ax = _figure((max(6.0, 1.2 * len(grid.columns) + 3), 0.8 * len(grid.index) + 2.5), style="white")
    sns.heatmap(grid, annot=True, fmt=".1f", cmap="viridis", cbar_kws={"label": "best val_acc (%)"}, ax=ax)
    outlined = "selected" in df and df["selected"].any()
    if outlined:
        best = df[df["selected"]].iloc[0]
        r = list(grid.index).index(f"{best['temperature']:g}")
        c = list(grid.columns).index(f"{best['alpha']:g}")
        ax.add_patch(Rectangle((c, r), 1, 1, fill=False, edgecolor="red", lw=3))
    ax.set_xlabel("alpha (weight of the KD term)")
    ax.set_ylabel("temperature T")
    _set_title(ax, (title or "kdparam grid") + ("\n(red: the selected cell)" if outlined else ""))
    return fig


def takd_chain(rows: list[dict], title: str = ""):
    """takd: validation and test accuracy along the chain teacher -> assistants -> student."""
    df = pd.DataFrame(rows)
    df["network"] = [f"{r.link}: {r.arch}\n({r.role})" for r in df.itertuples()]
    long = df.melt(id_vars=["link", "network"], value_vars=["best_val_acc", "test_acc"], var_name="split",
                   value_name="accuracy (%)").dropna(subset=["accuracy (%)"])
    long["split"] = long["split"].map({"best_val_acc": "val (best)", "test_acc": "test"})
    fig, ax = _figure((max(6.5, 1.8 * len(df)), 4.5))
    sns.pointplot(data=long, x="network", y="accuracy (%)", hue="split", order=list(df["network"]),
                  markers=["o", "s"], ax=ax)
    ax.set_xlabel("")
    ax.legend(fontsize=8, loc="best", title="split")
    _set_title(ax, title or "takd chain")
    return fig


# ------------------------------------------------------------ mode comparison
def _comparison_label(mode: str, teacher: str, ambiguous: bool) -> str:
    return f"{mode}\n({teacher})" if ambiguous and teacher and teacher != "none" else mode


def _labelled(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` (with mode and teacher columns) with a ``label`` column, sorted in the
    registry's mode order: the same labels, in the same order, in every comparison figure."""
    df = df.copy()
    ambiguous = df.groupby("mode")["teacher"].transform("nunique") > 1
    df["label"] = [_comparison_label(m, t, a) for m, t, a in zip(df["mode"], df["teacher"], ambiguous)]
    order = {m: i for i, m in enumerate(DISTILLATION_MODES)}
    df["_order"] = [order.get(m, len(order)) for m in df["mode"]]
    return df.sort_values(["_order", "teacher"], kind="stable").drop(columns="_order").reset_index(drop=True)


def mode_colors(labels) -> dict:
    """One colour per comparison label, the baseline grey: the same mode has the same
    colour in the mode figure and in the curves (18 distinct colours before any repeats)."""
    others = [label for label in dict.fromkeys(labels) if label.split("\n")[0] != BASELINE]
    palette = [c for i, c in enumerate(sns.color_palette("tab20", 20)) if i not in (14, 15)]  # not tab20's greys
    colors = {label: palette[i % len(palette)] for i, label in enumerate(others)}
    return {**{label: "#666666" for label in labels if label.split("\n")[0] == BASELINE}, **colors}


def accuracy_axis_range(values) -> tuple[float, float]:
    """The y range of an accuracy (%) plot of ``values``: below the lowest by at least 5
    points or the whole spread (whichever is more), down to a multiple of 5, so that a
    1-point difference looks like one and not like a cliff."""
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    lo, hi = float(arr.min()), float(arr.max())
    pad = max(5.0, hi - lo)
    floor = max(0.0, 5.0 * math.floor((lo - pad) / 5.0))
    top = min(5.0 * math.ceil((hi + max(2.0, 0.25 * (hi - lo))) / 5.0), max(100.0, hi + 1.0))
    return floor, top


def mode_comparison_points(summary: pd.DataFrame, teacher_acc: dict | None = None, nokd_acc: float | None = None,
                           title: str = ""):
    """compare: mean test accuracy per mode (one point per mode and teacher) with ± one
    standard deviation over seeds as error bars (none for a single seed); the teachers'
    accuracy and the nokd baseline's mean as horizontal reference lines. The y-axis
    starts well below every point and line (accuracy_axis_range) and the caption says
    where. Colours as in val_acc_curves (mode_colors)."""
    df = _labelled(summary)
    labels = list(df["label"])
    colors = mode_colors(labels)
    many = len(df) > 8
    fig, ax = _figure((max(7.0, 0.62 * len(df) + 3), 6.0))
    means = df["test_acc_mean"].to_numpy(dtype=float)
    stds = df["test_acc_std"].to_numpy(dtype=float)
    for i, (mean, sd, n, label) in enumerate(zip(means, stds, df["runs"], labels)):
        spread = not math.isnan(sd)  # one seed: no error bar rather than a zero one
        ax.errorbar([i], [mean], yerr=[sd] if spread else None, fmt="o", ms=9, color=colors[label],
                    ecolor=colors[label], elinewidth=1.8, capsize=6, capthick=1.8)
        ax.annotate(f"{mean:.2f}" + (f"\n±{sd:.2f}" if spread else "") + f"\nn={n}",
                    (i, mean + (sd if spread else 0.0)), textcoords="offset points", xytext=(0, 6), ha="center",
                    va="bottom", fontsize=7.5,
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})
    ax.set_xticks(range(len(df)), labels, rotation=35 if many else 0, ha="right" if many else "center")
    ax.set_xlim(-0.6, len(df) - 0.4)
    references = []
    for j, (teacher, acc) in enumerate(sorted((teacher_acc or {}).items())):
        if acc is not None and not math.isnan(acc):
            ax.axhline(acc, ls="--", lw=1.3, color=sns.color_palette("dark")[j % 10],
                       label=f"teacher {teacher} ({acc:.2f})")
            references.append(acc)
    if nokd_acc is not None and not math.isnan(nokd_acc):
        ax.axhline(nokd_acc, ls=":", lw=1.6, color="black", label=f"{BASELINE} mean ({nokd_acc:.2f})")
        references.append(nokd_acc)
    spread = np.nan_to_num(stds)
    floor, top = accuracy_axis_range([*(means - spread), *(means + spread), *references])
    ax.set_ylim(floor, top)
    if references:
        ax.legend(fontsize=8, loc="lower right", framealpha=0.9)
    ax.set_ylabel("test accuracy (%): mean ± 1 std over seeds")
    caption = f"the y-axis runs from {floor:g}% to {top:g}% (not from 0)"
    if np.isnan(stds).any():
        caption += "; no error bar: a single seed"
    ax.set_xlabel(caption, fontsize="small")
    _set_title(ax, title or "test accuracy by mode")
    return fig


def val_acc_curves(histories: pd.DataFrame, title: str = ""):
    """compare: validation accuracy per epoch (from 1), one small panel per mode (mean
    over seeds, the band one standard deviation), each with the baseline's mean curve as
    a grey reference; shared axes. Colours as in mode_comparison_points."""
    df = _labelled(histories)
    labels = list(dict.fromkeys(df["label"]))
    colors = mode_colors(labels)
    base = [label for label in labels if label.split("\n")[0] == BASELINE]
    panels = [label for label in labels if label not in base] or base
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    sns.set_theme(style="whitegrid", context="notebook")
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols + 0.8, 2.7 * nrows + 1.0), dpi=DPI,
                             layout="constrained", sharex=True, sharey=True, squeeze=False)
    stats = df.groupby(["label", "epoch"])["val_acc"].agg(["mean", "std"]).reset_index()
    for ax, label in zip(axes.flat, panels):
        for which in [*[b for b in base if b != label], label]:
            s = stats[stats["label"] == which]
            mine = which == label
            ax.plot(s["epoch"], s["mean"], marker="o" if mine else None, ms=3, lw=1.8 if mine else 1.3,
                    ls="-" if mine else "--", color=colors[which],
                    label=which.replace("\n", " ") + ("" if mine else " (reference)"))
            if s["std"].notna().any():
                ax.fill_between(s["epoch"], s["mean"] - s["std"].fillna(0), s["mean"] + s["std"].fillna(0),
                                color=colors[which], alpha=0.2 if mine else 0.1, lw=0)
        ax.set_title(label.replace("\n", " "), fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
        _epoch_axis(ax)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
    for ax in axes[:, 0]:
        ax.set_ylabel("val_acc (%)")
    for k, ax in enumerate(list(axes.flat)[len(panels):], start=len(panels)):
        fig.delaxes(ax)
        axes.flat[k - ncols].xaxis.set_tick_params(labelbottom=True)  # the panel above is now a column's last
    fig.suptitle(_wrapped((title or "validation accuracy by mode") + ": mean ± 1 std over seeds",
                          0.95 * fig.get_figwidth(), "figure.titlesize"))
    return fig


_TRIAL_STYLE = {"completed": ("o", "tab:blue"), "pruned": ("X", "tab:orange"), "failed": ("s", "tab:red")}


def tune_history(rows: list[dict], title: str = ""):
    """A search's history: each trial's best validation accuracy in the order trials
    started (pruned ones at the epoch ASHA stopped them), and the best completed so far."""
    df = pd.DataFrame(rows)
    df = df[df["best_val_acc"].notna()]
    fig, ax = _figure((7.5, 5.0))
    for status, (marker, color) in _TRIAL_STYLE.items():
        part = df[df["status"] == status]
        if len(part):
            label = status if status != "pruned" else "pruned (best val_acc before it was stopped)"
            ax.scatter(part["trial"], part["best_val_acc"], marker=marker, s=60, color=color, label=label, zorder=3)
    done = df[df["status"] == "completed"].sort_values("trial")
    if len(done):  # carried on to the last trial: what the search had found by then
        best = done["best_val_acc"].cummax().tolist()
        ax.step([*done["trial"], df["trial"].max()], [*best, best[-1]], where="post", color="tab:green", lw=2,
                label="best completed so far", zorder=2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial (in the order it started)")
    ax.set_ylabel("best val_acc (%)")
    ax.set_ylim(*accuracy_axis_range(df["best_val_acc"].tolist()))
    fig.legend(loc="outside lower center", ncols=3, fontsize="small")
    _set_title(ax, (title or "search") + ": selection on validation accuracy only")
    return fig


def tune_parameters(rows: list[dict], dims, title: str = ""):
    """Best validation accuracy against each searched parameter, one panel per parameter
    (log axis for loguniform ones); the selected trial is circled."""
    df = pd.DataFrame(rows)
    df = df[df["best_val_acc"].notna()].copy()
    fig, axes = _figure((4.2 * len(dims) + 0.8, 4.8), ncols=len(dims))
    axes = np.atleast_1d(axes)
    done = df[df["status"] == "completed"]
    best = done.loc[done["best_val_acc"].idxmax()] if len(done) else None
    low, high = accuracy_axis_range(df["best_val_acc"].tolist())
    for ax, dim in zip(axes, dims):
        values = df["params"].map(lambda p, name=dim.name: p[name])
        for status, (marker, color) in _TRIAL_STYLE.items():
            mask = df["status"] == status
            if mask.any():
                ax.scatter(values[mask].map(_numeric), df.loc[mask, "best_val_acc"], marker=marker, s=60, color=color,
                           label=status, zorder=3)
        if best is not None:
            ax.scatter([_numeric(best["params"][dim.name])], [best["best_val_acc"]], s=260, facecolors="none",
                       edgecolors="tab:green", lw=2, label="selected", zorder=4)
        if dim.log_scale():
            from matplotlib.ticker import NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        if dim.kind != "choice":  # the whole searched range, so that where trials fell shows
            lo, hi = dim.values
            pad = (hi / lo) ** 0.04 if dim.log_scale() else 0.04 * (hi - lo)
            ax.set_xlim(*((lo / pad, hi * pad) if dim.log_scale() else (lo - pad, hi + pad)))
        ax.set_xlabel(f"{dim.name} ({dim.kind})")
        ax.set_ylabel("best val_acc (%)")
        ax.set_ylim(low, high)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize="small")
    fig.suptitle(_wrapped(title or "search", 0.9 * fig.get_figwidth(), "axes.titlesize"))
    return fig


def _numeric(value):
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)
