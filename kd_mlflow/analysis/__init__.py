"""Reading runs and comparing modes: ``runs`` (which runs count), ``statistics`` (t tests,
paired and Welch intervals, Holm), ``compare`` (the per-mode table of an experiment),
``report`` (Markdown, files, the logged comparison) and ``plots`` (every figure). Runs are
read through kd_mlflow.tracking; nothing here imports mlflow."""
