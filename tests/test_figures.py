"""Every figure renders to a PNG a person can read: the expected series, 1-based integer
epochs, dpi >= 150, and no text outside the figure. Small synthetic inputs, no training."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.container import ErrorbarContainer

from kd_mlflow.analysis import plots
from kd_mlflow.analysis.compare import Comparison
from kd_mlflow.analysis.report import comparison_figures

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def rendered(fig, tmp_path, name: str):
    """Save ``fig`` as MLflow's log_figure does (no dpi, no bbox_inches) and check that it
    is a PNG at >= 150 dpi with every axes (titles, labels, tick labels, legends) and the
    suptitle inside the canvas."""
    path = tmp_path / f"{name}.png"
    fig.savefig(path)
    assert path.read_bytes()[:8] == PNG
    assert fig.dpi >= 150
    renderer = fig.canvas.get_renderer()
    canvas = fig.bbox
    boxes = [ax.get_tightbbox(renderer) for ax in fig.axes]
    if fig._suptitle is not None:
        boxes.append(fig._suptitle.get_window_extent(renderer))
    for box in boxes:
        assert box.x0 >= canvas.x0 - 1 and box.y0 >= canvas.y0 - 1, (name, box, canvas)
        assert box.x1 <= canvas.x1 + 1 and box.y1 <= canvas.y1 + 1, (name, box, canvas)
    return fig


def line_labels(ax) -> list[str]:
    return [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]


def legend_texts(ax) -> list[str]:
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


def integer_epochs(ax) -> bool:
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    return bool(ticks) and all(float(t).is_integer() for t in ticks) and min(ticks) >= 1


def kd_history(epochs: int = 5) -> list[dict]:
    rows = []
    for e in range(epochs):
        ce, kd = 1.0 / (e + 1), 2.0 / (e + 1)
        rows.append({"train_loss": ce + kd, "loss_ce": ce, "loss_kd": kd, "train_acc": 60.0 + 7 * e,
                     "val_acc": [55.0, 63.0, 70.0, 69.5, 68.0][e % 5], "val_loss": 0.9 - 0.1 * e, "lr": 0.1})
    return rows


def test_learning_curves(tmp_path):
    fig = rendered(plots.learning_curves(kd_history(5), "kd: resnet8 on fashion_mnist", teacher="resnet20",
                                         teacher_acc=92.31, best_epoch=2, test_acc=85.5), tmp_path, "learning_curves")
    ax_loss, ax_acc = fig.axes
    title = fig._suptitle.get_text().replace("\n", " ")
    assert all(word in title for word in ("kd", "resnet8", "fashion_mnist", "resnet20", "92.31"))
    # the student's own score, and the teacher's named as the teacher's
    assert "student test_acc 85.50%" in title and "the teacher's own test_acc 92.31%" in title
    # every weighted term is drawn above train_loss, so a term that is most of the loss stays visible
    lines = {line.get_label(): line for line in ax_loss.get_lines()}
    train = next(line for label, line in lines.items() if label.startswith("train_loss"))
    assert all(lines[t].get_zorder() > train.get_zorder() for t in ("ce (weighted)", "kd (weighted)"))
    loss_lines = line_labels(ax_loss)
    assert any(label.startswith("train_loss") for label in loss_lines)
    assert any(label.startswith("val_loss") for label in loss_lines)
    assert "ce (weighted)" in loss_lines and "kd (weighted)" in loss_lines
    assert "weighted" in ax_loss.get_legend().get_title().get_text()
    assert {"train_acc", "val_acc"} <= set(line_labels(ax_acc))
    # the selected epoch: best_epoch 2 (0-based, as logged) is epoch 3 of 5 on the figure
    selected = [line for line in ax_acc.get_lines() if line.get_label().startswith("selected")]
    assert len(selected) == 1 and list(selected[0].get_xdata()) == [3]
    assert "epoch 3 of 5" in selected[0].get_label()
    val = next(line for line in ax_acc.get_lines() if line.get_label() == "val_acc")
    assert list(val.get_xdata()) == [1, 2, 3, 4, 5]
    for ax in (ax_loss, ax_acc):
        assert integer_epochs(ax), ax.get_xticks()
        assert "epoch" in ax.get_xlabel()


def test_learning_curves_one_term_and_default_selection(tmp_path):
    """nokd: one term equal to train_loss (not drawn twice); without best_epoch the first
    best val_acc is marked; two epochs still get integer ticks only."""
    history = [{"train_loss": 1.0, "loss_ce": 1.0, "train_acc": 50.0, "val_acc": 60.0, "val_loss": 1.1},
               {"train_loss": 0.8, "loss_ce": 0.8, "train_acc": 60.0, "val_acc": 58.0, "val_loss": 1.0}]
    fig = rendered(plots.learning_curves(history, "nokd: resnet8 on fashion_mnist", teacher="none"),
                   tmp_path, "learning_curves_nokd")
    ax_loss, ax_acc = fig.axes
    assert line_labels(ax_loss)[0] == "train_loss (= ce)" and len(line_labels(ax_loss)) == 2
    selected = [line for line in ax_acc.get_lines() if line.get_label().startswith("selected")]
    assert list(selected[0].get_xdata()) == [1]
    assert all(integer_epochs(ax) for ax in (ax_loss, ax_acc))
    assert "teacher none" in fig._suptitle.get_text()


def test_teacher_vs_student(tmp_path):
    rows = [{"index": 1, "teacher_spec": "resnet14", "teacher_arch": "resnet14", "teacher_test_acc": 91.2,
             "student_best_val_acc": 89.1, "student_test_acc": 88.7, "selected": False},
            {"index": 2, "teacher_spec": "pretrained/fashion_mnist-resnet20.pt", "teacher_arch": "resnet20",
             "teacher_test_acc": 92.3, "student_best_val_acc": 89.9, "student_test_acc": 89.4, "selected": True},
            {"index": 3, "teacher_spec": "wrn16", "teacher_arch": "wrn16", "teacher_test_acc": None,
             "student_best_val_acc": 80.0, "student_test_acc": 80.0, "selected": False}]
    fig = rendered(plots.teacher_vs_student(rows, "allkd: resnet8 on fashion_mnist " * 3), tmp_path, "tvs")
    (ax,) = fig.axes
    texts = legend_texts(ax)
    assert any(t.startswith("1: resnet14") for t in texts)
    assert any(t.startswith("2: fashion_mnist-resnet20.pt") and "selected" in t for t in texts)
    assert "student = teacher" in texts
    assert len(ax.collections) == 2  # one point per teacher with a known accuracy
    assert "\n" in ax.get_title()  # the long title is wrapped, not cut


def test_kdparam_heatmap(tmp_path):
    rows = [{"temperature": t, "alpha": a, "best_val_acc": 80 + t + a, "selected": (t, a) == (4.0, 0.9)}
            for t in (1.0, 4.0) for a in (0.5, 0.9)]
    fig = rendered(plots.kdparam_heatmap(rows, "kdparam: resnet8 from resnet20 on fashion_mnist"),
                   tmp_path, "kdparam")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.5", "0.9"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1", "4"]
    assert sorted(t.get_text() for t in ax.texts) == ["81.5", "81.9", "84.5", "84.9"]
    assert len(ax.patches) == 1  # the selected cell's outline
    assert "selected" in ax.get_title()


def test_takd_chain(tmp_path):
    rows = [{"link": 0, "arch": "resnet110", "role": "teacher", "best_val_acc": 93.1, "test_acc": 92.8},
            {"link": 1, "arch": "resnet8", "role": "student", "best_val_acc": 89.6, "test_acc": 89.1}]
    title = "takd: resnet110 -> resnet56 -> resnet32 -> resnet20 -> resnet14 -> resnet8 on fashion_mnist"
    fig = rendered(plots.takd_chain(rows, title), tmp_path, "takd")
    (ax,) = fig.axes
    assert ax.get_title().replace("\n", " ") == title
    assert {"val (best)", "test"} <= set(legend_texts(ax))
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0: resnet110\n(teacher)", "1: resnet8\n(student)"]


def summary_frame() -> pd.DataFrame:
    rows = [("nokd", "none", 3, 88.5, 0.4), ("kd", "resnet20", 3, 90.1, 0.5), ("dkd", "resnet20", 1, 91.0, math.nan)]
    return pd.DataFrame([{"dataset": "fashion_mnist", "student": "resnet8", "mode": m, "teacher": t, "runs": n,
                          "test_acc_mean": mean, "test_acc_std": sd} for m, t, n, mean, sd in rows])


def test_mode_comparison_points(tmp_path):
    fig = rendered(plots.mode_comparison_points(summary_frame(), teacher_acc={"resnet20": 92.3}, nokd_acc=88.5,
                                                title="test accuracy by mode (bench)"), tmp_path, "modes")
    (ax,) = fig.axes
    containers = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(containers) == 3  # one point per mode; the single-seed one has no bar
    assert [c.has_yerr for c in containers] == [True, False, True]  # registry order: the baseline, then by name
    assert [t.get_text() for t in ax.get_xticklabels()] == ["nokd", "dkd", "kd"]
    assert not ax.patches  # points, not bars
    # the y-axis starts at least 5 points below every point, error bar and reference line
    lowest = min(88.5 - 0.4, 90.1 - 0.5, 91.0, 92.3, 88.5)
    low, high = ax.get_ylim()
    assert low <= lowest - 5 and high >= 92.3
    assert f"{low:g}%" in ax.get_xlabel() and "not from 0" in ax.get_xlabel()
    assert "single seed" in ax.get_xlabel()  # dkd has one seed
    assert "std" in ax.get_ylabel()
    assert {"teacher resnet20 (92.30)", "nokd mean (88.50)"} <= set(legend_texts(ax))
    # every mode with two or more seeds: no caption about single seeds
    two = summary_frame().assign(test_acc_std=[0.4, 0.5, 0.6], runs=[2, 2, 2])
    ax2 = rendered(plots.mode_comparison_points(two), tmp_path, "modes2").axes[0]
    assert "single seed" not in ax2.get_xlabel()


def test_comparison_figures_give_a_mode_one_colour_and_16_modes_stay_readable(tmp_path):
    from matplotlib.colors import to_hex

    from kd_mlflow.modes import DISTILLATION_MODES

    modes = list(DISTILLATION_MODES)
    summary = pd.DataFrame([{"dataset": "d", "student": "s", "mode": m, "teacher": "none" if m == "nokd" else "t",
                             "runs": 2, "test_acc_mean": 80.0 + i % 7, "test_acc_std": 0.5}
                            for i, m in enumerate(reversed(modes))])  # any order in, registry order out
    histories = pd.DataFrame([{"mode": m, "teacher": "none" if m == "nokd" else "t", "seed": s, "epoch": e,
                               "val_acc": 70.0 + e + s} for m in modes for s in (0, 1) for e in (1, 2, 3)])
    points = rendered(plots.mode_comparison_points(summary), tmp_path, "many_modes")
    curves = rendered(plots.val_acc_curves(histories), tmp_path, "many_curves")
    (ax,) = points.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == modes
    point_color = {label.get_text(): to_hex(c.lines[0].get_color())
                   for label, c in zip(ax.get_xticklabels(), [c for c in ax.containers
                                                              if isinstance(c, ErrorbarContainer)])}
    panels = curves.axes
    assert [a.get_title() for a in panels] == modes[1:]  # one panel per mode, nokd the reference in each
    for a in panels:
        mine = next(line for line in a.get_lines() if line.get_label() == a.get_title())
        assert to_hex(mine.get_color()) == point_color[a.get_title()], a.get_title()
        assert any(line.get_label() == "nokd (reference)" for line in a.get_lines())
    non_baseline = [point_color[m] for m in modes[1:]]
    assert len(set(non_baseline)) == len(non_baseline) and point_color["nokd"] not in non_baseline
    # large enough to read, small enough to show: at most 2,400 px wide at the figures' 150 dpi
    for fig in (points, curves):
        assert fig.get_size_inches()[0] * fig.dpi <= 2400


@pytest.mark.parametrize("values, expected", [([88.1, 92.3], (80.0, 95.0)), ([3.0, 10.0], (0.0, 15.0)),
                                              ([99.0, 100.0], (90.0, 101.0))])
def test_accuracy_axis_range(values, expected):
    assert plots.accuracy_axis_range(values) == expected


def test_val_acc_curves(tmp_path):
    histories = pd.DataFrame([{"mode": m, "teacher": "resnet20", "seed": s, "epoch": e + 1, "val_acc": 60 + 5 * e + s}
                              for m in ("nokd", "kd") for s in range(2) for e in range(3)])
    fig = rendered(plots.val_acc_curves(histories, "validation accuracy (bench)"), tmp_path, "val_acc")
    (ax,) = fig.axes  # one panel: kd, with nokd as its reference
    assert legend_texts(ax) == ["nokd (reference)", "kd"] and ax.get_title() == "kd"
    assert integer_epochs(ax)
    assert sorted({x for line in ax.get_lines() for x in line.get_xdata()}) == [1, 2, 3]
    kd = next(line for line in ax.get_lines() if line.get_label() == "kd")
    assert list(kd.get_ydata()) == [60.5, 65.5, 70.5]  # the mean over the two seeds


def test_comparison_figures_render(tmp_path):
    """compare's figures from a Comparison: the mode figure with its reference lines."""
    summary = summary_frame()
    runs = pd.DataFrame({"teacher": ["none", "resnet20"], "teacher_test_acc": [np.nan, 92.3]})
    histories = pd.DataFrame([{"run_id": "r", "mode": "kd", "teacher": "resnet20", "seed": 0, "epoch": e,
                               "val_acc": 70.0 + e} for e in (1, 2)])
    c = Comparison(experiment="bench", experiment_id="1", runs=runs, summary=summary, excluded=pd.DataFrame(),
                   settings={}, histories=histories)
    figures = comparison_figures(c)
    assert set(figures) == {"figures/test_acc_by_mode.png", "figures/val_acc_curves.png"}
    ax = rendered(figures["figures/test_acc_by_mode.png"], tmp_path, "compare_modes").axes[0]
    assert {"teacher resnet20 (92.30)", "nokd mean (88.50)"} <= set(legend_texts(ax))
    rendered(figures["figures/val_acc_curves.png"], tmp_path, "compare_curves")
