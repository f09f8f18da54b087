"""Seaborn figures. Headless (Agg) so they render on servers and in CI."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402


def learning_curves(history: list[dict], title: str = ""):
    """Loss terms (left) and train/val accuracy (right) per epoch."""
    df = pd.DataFrame(history)
    df["epoch"] = range(1, len(df) + 1)
    loss_cols = [c for c in df.columns if c == "train_loss" or c.startswith("loss_")]
    acc_cols = [c for c in ("train_acc", "val_acc") if c in df.columns]
    sns.set_theme(style="whitegrid", context="notebook")
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    sns.lineplot(data=df.melt("epoch", loss_cols, "term", "loss"), x="epoch", y="loss", hue="term",
                 marker="o", ax=ax_loss)
    ax_loss.set_title("loss terms")
    sns.lineplot(data=df.melt("epoch", acc_cols, "split", "accuracy (%)"), x="epoch", y="accuracy (%)",
                 hue="split", marker="o", ax=ax_acc)
    ax_acc.set_title("accuracy")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# ------------------------------------------------------ multi-stage strategies
def teacher_vs_student(rows: list[dict], title: str = ""):
    """allkd: each student's test accuracy against its teacher's, one labelled point
    per pair (does a better teacher make a better student?). The selected student
    (best validation accuracy) is drawn as a star."""
    df = pd.DataFrame(rows)
    df["teacher_test_acc"] = pd.to_numeric(df["teacher_test_acc"], errors="coerce")
    df["pair"] = df["teacher_arch"]
    df["selected"] = df.get("selected", False)
    sns.set_theme(style="whitegrid", context="notebook")
    fig, ax = plt.subplots(figsize=(6.5, 5))
    known = df.dropna(subset=["teacher_test_acc"])
    if len(known):
        sns.scatterplot(data=known, x="teacher_test_acc", y="student_test_acc", hue="pair", style="selected",
                        markers={True: "*", False: "o"}, s=180, ax=ax)
        for _, row in known.iterrows():
            label = row["teacher_spec"] if row["teacher_spec"].startswith("models:/") else \
                row["teacher_spec"].rsplit("/", 1)[-1]
            ax.annotate(f"{label}\nval {row['student_best_val_acc']:.1f}",
                        (row["teacher_test_acc"], row["student_test_acc"]), textcoords="offset points",
                        xytext=(8, 4), fontsize=8)
        lo = min(known["teacher_test_acc"].min(), known["student_test_acc"].min())
        hi = max(known["teacher_test_acc"].max(), known["student_test_acc"].max())
        pad = max(1.0, 0.05 * (hi - lo))
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], ls="--", c="grey", lw=1, label="student = teacher")
        ax.legend(fontsize=8, loc="best")
    missing = df[df["teacher_test_acc"].isna()]
    if len(missing):
        ax.text(0.01, 0.01, "teacher accuracy unknown: " + ", ".join(missing["teacher_spec"]),
                transform=ax.transAxes, fontsize=8, color="grey")
    ax.set_xlabel("teacher test accuracy (%)")
    ax.set_ylabel("student test accuracy (%)")
    ax.set_title(title or "teacher vs student")
    fig.tight_layout()
    return fig


def kdparam_heatmap(rows: list[dict], title: str = ""):
    """kdparam: best validation accuracy of each (temperature, alpha) cell, annotated;
    the selected cell is outlined."""
    from matplotlib.patches import Rectangle

    df = pd.DataFrame(rows)
    grid = df.pivot(index="temperature", columns="alpha", values="best_val_acc")
    grid.index = [f"{t:g}" for t in grid.index]
    grid.columns = [f"{a:g}" for a in grid.columns]
    sns.set_theme(style="white", context="notebook")
    fig, ax = plt.subplots(figsize=(1.2 * len(grid.columns) + 3, 0.8 * len(grid.index) + 2))
    sns.heatmap(grid, annot=True, fmt=".1f", cmap="viridis", cbar_kws={"label": "best val_acc (%)"}, ax=ax)
    if "selected" in df and df["selected"].any():
        best = df[df["selected"]].iloc[0]
        r = list(grid.index).index(f"{best['temperature']:g}")
        c = list(grid.columns).index(f"{best['alpha']:g}")
        ax.add_patch(Rectangle((c, r), 1, 1, fill=False, edgecolor="red", lw=3))
    ax.set_xlabel("alpha (weight of the KD term)")
    ax.set_ylabel("temperature T")
    ax.set_title(title or "kdparam grid")
    fig.tight_layout()
    return fig


def takd_chain(rows: list[dict], title: str = ""):
    """takd: validation and test accuracy along the chain teacher -> assistants -> student."""
    df = pd.DataFrame(rows)
    df["network"] = [f"{r.link}: {r.arch}\n({r.role})" for r in df.itertuples()]
    long = df.melt(id_vars=["link", "network"], value_vars=["best_val_acc", "test_acc"], var_name="split",
                   value_name="accuracy (%)").dropna(subset=["accuracy (%)"])
    long["split"] = long["split"].map({"best_val_acc": "val (best)", "test_acc": "test"})
    sns.set_theme(style="whitegrid", context="notebook")
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(df)), 4))
    sns.pointplot(data=long, x="network", y="accuracy (%)", hue="split", order=list(df["network"]),
                  markers=["o", "s"], ax=ax)
    ax.set_xlabel("")
    ax.set_title(title or "takd chain")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------ mode comparison
def _comparison_label(mode: str, teacher: str, ambiguous: bool) -> str:
    return f"{mode}\n({teacher})" if ambiguous and teacher and teacher != "none" else mode


def mode_comparison_bars(summary: pd.DataFrame, teacher_acc: dict | None = None, nokd_acc: float | None = None,
                         title: str = ""):
    """compare: mean test accuracy per mode (one bar per mode and teacher) with the
    standard deviation over seeds as error bars; the teachers' accuracy and the nokd
    baseline's mean as horizontal reference lines."""
    import numpy as np

    df = summary.copy()
    ambiguous = df.groupby("mode")["teacher"].transform("nunique") > 1
    df["label"] = [_comparison_label(m, t, a) for m, t, a in zip(df["mode"], df["teacher"], ambiguous)]
    sns.set_theme(style="whitegrid", context="notebook")
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(df) + 2), 4.8))
    palette = ["#999999" if m == "nokd" else c for m, c in zip(df["mode"], sns.color_palette("deep", len(df)))]
    sns.barplot(data=df, x="label", y="test_acc_mean", hue="label", palette=palette, legend=False,
                order=list(df["label"]), ax=ax)
    std = df["test_acc_std"].fillna(0.0).to_numpy()
    has_spread = df["test_acc_std"].notna().to_numpy()  # one seed: no error bar rather than a zero one
    if has_spread.any():
        ax.errorbar(np.arange(len(df))[has_spread], df["test_acc_mean"].to_numpy()[has_spread],
                    yerr=std[has_spread], fmt="none", ecolor="black", capsize=4, lw=1.2)
    for i, (mean, sd, n) in enumerate(zip(df["test_acc_mean"], std, df["runs"])):
        ax.annotate(f"{mean:.2f}\nn={n}", (i, mean + sd), textcoords="offset points", xytext=(0, 4), ha="center",
                    va="bottom", fontsize=8)
    lines = []
    for j, (teacher, acc) in enumerate(sorted((teacher_acc or {}).items())):
        if acc is not None and not np.isnan(acc):
            ax.axhline(acc, ls="--", lw=1.3, color=sns.color_palette("dark")[j % 10], label=f"teacher {teacher} ({acc:.2f})")
            lines.append(acc)
    if nokd_acc is not None and not np.isnan(nokd_acc):
        ax.axhline(nokd_acc, ls=":", lw=1.6, color="black", label=f"nokd mean ({nokd_acc:.2f})")
        lines.append(nokd_acc)
    values = np.concatenate([df["test_acc_mean"].to_numpy() - std, df["test_acc_mean"].to_numpy() + std,
                             np.array(lines, dtype=float)])
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    pad = max(1.0, 0.15 * (hi - lo))
    ax.set_ylim(max(0.0, lo - 2 * pad), min(100.0, hi + 2 * pad))  # bars from 0 would hide the differences
    if lines:
        ax.legend(fontsize=8, loc="best")
    ax.set_xlabel("")
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title(title or "test accuracy by mode")
    fig.tight_layout()
    return fig


def val_acc_curves(histories: pd.DataFrame, title: str = ""):
    """compare: validation accuracy per epoch of every mode on one plot (mean over
    seeds, the band one standard deviation)."""
    df = histories.copy()
    from matplotlib.ticker import MaxNLocator

    ambiguous = df.groupby("mode")["teacher"].transform("nunique") > 1
    df["mode "] = [_comparison_label(m, t, a).replace("\n", " ") for m, t, a in
                   zip(df["mode"], df["teacher"], ambiguous)]
    sns.set_theme(style="whitegrid", context="notebook")
    fig, ax = plt.subplots(figsize=(8, 5))
    sns.lineplot(data=df, x="epoch", y="val_acc", hue="mode ", errorbar="sd", marker="o", ax=ax)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title or "validation accuracy by mode")
    ax.legend(fontsize=8, loc="lower right", title="mode")
    fig.tight_layout()
    return fig
