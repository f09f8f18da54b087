"""Has a mode converged in a benchmark? Reads the val_acc curves of an experiment's
finished runs of one mode from MLflow and prints, per run, the best epoch, the spread of
val_acc over the last K epochs, and test_acc against test_acc_last.

    MLFLOW_TRACKING_URI=sqlite:///$HOME/kd-benchmark/mlflow.db \\
        python bench/convergence.py --experiment fmnist-benchmark --mode nokd --last 6

A run has converged in this sense when its val_acc moves by less than a point over the
last K epochs (after the last learning-rate step) and its best epoch is among them.
"""

from __future__ import annotations

import argparse
import statistics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--mode", default="nokd")
    parser.add_argument("--last", type=int, default=6, help="the last K epochs")
    args = parser.parse_args()

    from mlflow import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(args.experiment)
    if exp is None:
        raise SystemExit(f"error: no experiment {args.experiment!r} at this tracking URI")
    runs = [r for r in client.search_runs([exp.experiment_id], f"tags.mode = '{args.mode}'")
            if r.info.status == "FINISHED" and "test_acc" in r.data.metrics]
    if not runs:
        raise SystemExit(f"error: no finished {args.mode} run in {args.experiment}")
    spreads = []
    print(f"{'run':34} seed  epochs  best_epoch  val_acc last {args.last} (min..max)  spread  test_acc  test_acc_last")
    for r in sorted(runs, key=lambda r: int(r.data.params.get("seed", 0))):
        curve = [m.value for m in sorted(client.get_metric_history(r.info.run_id, "val_acc"), key=lambda m: m.step)]
        tail = curve[-args.last:]
        spreads.append(max(tail) - min(tail))
        best = max(range(len(curve)), key=lambda i: (curve[i], -i)) + 1
        m = r.data.metrics
        print(f"{r.info.run_id:34} {r.data.params.get('seed', '?'):>4}  {len(curve):6}  {best:10}  "
              f"{min(tail):6.2f}..{max(tail):6.2f}{'':14}{spreads[-1]:6.2f}  {m['test_acc']:8.2f}  "
              f"{m.get('test_acc_last', float('nan')):13.2f}")
    print(f"spread of val_acc over the last {args.last} epochs: mean {statistics.fmean(spreads):.2f}, "
          f"max {max(spreads):.2f} points over {len(spreads)} runs")


if __name__ == "__main__":
    main()
