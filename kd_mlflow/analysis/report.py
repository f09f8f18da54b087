"""A comparison rendered: Markdown tables, its figures, the files it writes and the run it is
logged as."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pandas as pd

from ..modes import BASELINE
from .runs import PROVENANCE
from .statistics import CONFIDENCE

def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub Markdown table (pandas' to_markdown needs tabulate, not a dependency)."""
    def cell(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        return str(v).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(cell(c) for c in df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _fmt(v, spec: str = ".2f") -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _interval(estimate, low, high) -> str:
    """"+2.67 [+1.51, +3.83]"; the estimate alone without an interval; "" without either."""
    text = _fmt(estimate, "+.2f")
    if text and not math.isnan(low):
        text += f" [{low:+.2f}, {high:+.2f}]"
    return text


def display_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary as people read it: mean ± std, the gain with its interval."""
    rows = []
    # the epochs' time where every row has it (a stopped and continued run's wall time
    # counts the pause), the wall time otherwise (runs CSVs written before it was recorded)
    train_times = summary["train_seconds_mean"].notna().all()
    for r in summary.itertuples():
        # the test that matches the design: paired on matched seeds where there are >= 2
        paired = r.gain_test == "paired"
        estimate, low, high, p_holm = ((r.paired_gain, r.paired_ci_low, r.paired_ci_high, r.paired_p_holm) if paired
                                       else (r.gain_vs_nokd, r.gain_ci_low, r.gain_ci_high, r.gain_p_holm))
        gain = _interval(estimate, low, high)
        rows.append({"dataset": r.dataset, "student": r.student, "mode": r.mode, "teacher": r.teacher,
                     "seeds": r.runs,
                     "test_acc (%)": _fmt(r.test_acc_mean) + (f" ± {r.test_acc_std:.2f}" if not math.isnan(r.test_acc_std) else ""),
                     "test_acc_last (%)": _fmt(r.test_acc_last_mean) + (
                         f" ± {r.test_acc_last_std:.2f}" if not math.isnan(r.test_acc_last_std) else ""),
                     "best val_acc (%)": _fmt(r.best_val_acc_max),
                     **({"train time (s)": _fmt(r.train_seconds_mean, ".1f")} if train_times
                        else {"wall time (s)": _fmt(r.wall_seconds_mean, ".1f")}),
                     f"gain vs nokd [{int(CONFIDENCE * 100)}% CI]": gain,
                     "test": f"paired ({r.paired_seeds})" if paired else r.gain_test,
                     "p (Holm)": _fmt(p_holm, ".3g"),
                     f"Welch [{int(CONFIDENCE * 100)}% CI]": _interval(r.gain_vs_nokd, r.gain_ci_low, r.gain_ci_high),
                     "Welch p (Holm)": _fmt(r.gain_p_holm, ".3g")})
    return pd.DataFrame(rows)


def comparison_markdown(c) -> str:
    lines = [f"## Comparison of experiment `{c.experiment}`", ""]
    if c.settings:
        lines.append("Common settings (majority): " + ", ".join(f"{k}={v}" for k, v in c.settings.items()))
        lines.append("")
    if len(c.summary):
        lines += [markdown_table(display_table(c.summary)), "",
                  f"test_acc: mean ± sample standard deviation over seeds; best val_acc: the best over seeds; "
                  f"gain: test_acc minus nokd's (same dataset and student) with its {int(CONFIDENCE * 100)}% "
                  f"t interval. train time: the mean over seeds of the sum of a run's epoch times (training and "
                  f"validation; a multi-stage run's stages summed), which leaves out start-up, export and "
                  f"any time a run spent stopped before it was continued; wall time: end - start. "
                  f"Seed k trains every mode on the same split in the same batch order, so where "
                  f"a mode and nokd share >= 2 seeds the test is paired on those seeds (the gain is then the "
                  f"mean of the per-seed differences); otherwise Welch's, with >= 2 seeds each. "
                  f"test_acc is the best-validation student, test_acc_last the last epoch's (both the exported "
                  f"fp32 model). p (Holm): that test of gain = 0, Holm-adjusted over all modes compared "
                  f"with the same nokd; Welch: Welch's unpaired interval and Holm-adjusted test for every mode, "
                  f"for reference. An interval is per mode and not adjusted, so with many modes trust "
                  f"p (Holm) < 0.05 rather than an interval that just excludes 0."]
    else:
        lines.append("No comparable runs.")
    lines.append("")
    notes = provenance_notes(c.runs)
    if notes:
        lines += ["### Provenance", "", *[f"- note: {note}" for note in notes], ""]
    if len(c.excluded):
        lines += [f"### Left out ({len(c.excluded)} runs)", "",
                  markdown_table(c.excluded.assign(seed=c.excluded["seed"].map(
                      lambda s: "" if s is None or (isinstance(s, float) and math.isnan(s)) else str(int(s)))))]
    else:
        lines.append("No runs were left out.")
    return "\n".join(lines) + "\n"


def comparison_figures(c) -> dict:
    """{artifact path: figure} for the comparison run."""
    from .plots import mode_comparison_points, val_acc_curves

    figures = {}
    if len(c.summary):
        nokd = c.summary.loc[c.summary["mode"] == BASELINE, "test_acc_mean"]
        teachers = (c.runs.dropna(subset=["teacher_test_acc"]).groupby("teacher")["teacher_test_acc"].mean()
                    .to_dict())
        figures["figures/test_acc_by_mode.png"] = mode_comparison_points(
            c.summary, teacher_acc=teachers, nokd_acc=float(nokd.iloc[0]) if len(nokd) else None,
            title=f"test accuracy by mode ({c.experiment})")
    if len(c.histories):
        figures["figures/val_acc_curves.png"] = val_acc_curves(c.histories, title=f"validation accuracy ({c.experiment})")
    return figures


def write_comparison(c, out: Path, figures: bool = False) -> list[Path]:
    """The tables (CSV + Markdown) and settings into ``out`` (and, with ``figures``, the
    figures as PNG under ``out/figures``) -> the files written."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    c.summary.to_csv(out / "summary.csv", index=False)
    c.runs.to_csv(out / "runs.csv", index=False)
    c.excluded.to_csv(out / "excluded.csv", index=False)
    (out / "summary.md").write_text(comparison_markdown(c))
    (out / "settings.json").write_text(json.dumps({"experiment": c.experiment, "experiment_id": c.experiment_id,
                                                   "common_settings": c.settings}, indent=2))
    written = sorted(out.iterdir())
    if figures:
        import matplotlib.pyplot as plt

        for path, fig in comparison_figures(c).items():
            target = out / path
            target.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(target, dpi=150, bbox_inches="tight")
            plt.close(fig)
            written.append(target)
    return written


def log_comparison(c, tracker) -> None:
    """Tables (CSV + Markdown), the excluded runs and figures as artifacts of ``tracker``'s run."""
    with tempfile.TemporaryDirectory() as tmp:
        for f in write_comparison(c, Path(tmp) / "compare"):
            tracker.log_artifact(f, "compare")
    for path, fig in comparison_figures(c).items():
        tracker.log_figure(fig, path)
    tracker.log_metrics({"runs_compared": len(c.runs), "runs_left_out": len(c.excluded),
                         "modes_compared": int(c.summary["mode"].nunique()) if len(c.summary) else 0})
    tracker.set_tags({"compared_experiment": c.experiment, "compared_experiment_id": c.experiment_id})


def provenance_notes(runs: pd.DataFrame) -> list[str]:
    """One line per provenance tag whose compared runs disagree (a table that mixes code
    versions, CPU kinds, precisions or thread counts), and one for runs that record none."""
    notes = []
    if not len(runs):
        return notes
    for name in (n for n in PROVENANCE if n in runs):
        values = sorted({v for v in runs[name] if v})
        if len(values) > 1:
            counts = runs[name].value_counts()
            notes.append(f"the runs differ in {name}: " + ", ".join(f"{v} ({counts[v]} runs)" for v in values))
    unrecorded = int((runs["code_version"] == "").sum()) if "code_version" in runs else len(runs)
    if unrecorded:
        notes.append(f"{unrecorded} run(s) record no code_version (logged before runs recorded it)")
    return notes
