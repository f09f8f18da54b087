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
