"""The benchmark runs and writes its JSON (numbers are the benchmark's business, not the
tests': nothing here asserts a speed)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_throughput_benchmark_quick(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "bench/throughput.py", "--quick", "--device", "cpu", "--repeats", "2",
                           "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["modes"]) == {"nokd", "kd", "rkd", "oh"}  # the modes with a reference loop
    for mode in result["modes"].values():
        assert mode["package"]["images_per_second"] > 0 and mode["reference_images_per_second"] > 0
        # the package row is the one precision=auto picks
        assert mode["package"] == mode[f"package_{result['precision']}"]
    # fp32 and bf16 side by side (--quick: kd only)
    kd = result["modes"]["kd"]
    assert kd["package_fp32"]["images_per_second"] > 0 and kd["package_bf16"]["images_per_second"] > 0
    for key in ("tracker_share_of_epoch", "log_model_seconds"):
        assert result["mlflow"][key] >= 0
    assert result["startup_seconds"]["fresh_store"] > 0 and result["startup_seconds"]["existing_store"] > 0
    assert result["memory"]["process_peak_rss_mib"] > 0
    assert "ratio" in proc.stdout and "auto/other" in proc.stdout
    # --repeats 2: every run kept; the row is the lower of the two (a measured run, not a mean),
    # and each run's own ratio pairs the package's and the reference's runs in turn
    assert result["repeats"] == 2 and "ratio range" in proc.stdout
    for mode in result["modes"].values():
        runs, refs = mode["package"]["runs"], mode["reference_runs"]
        assert len(runs) == len(refs) == 2
        assert mode["package"]["images_per_second"] == min(runs)
        assert mode["reference_images_per_second"] == min(refs)
        assert mode["ratio"] == min(runs) / min(refs)
        assert mode["ratio_runs"] == [p / r for p, r in zip(runs, refs)]
