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
