"""kdparam: a grid over KD's temperature x alpha, one nested run per pair."""

from __future__ import annotations

from ..spec import DATA, LS, OPTIM, PAIR, RUNTIME, Mode, Param, all_of, nonempty_list, numbers


METHOD = Mode(
    "kdparam", "Grid search over KD temperature x alpha, one nested run per pair.", "strategy",
    (*DATA, *PAIR,
     Param("temperatures", "str", "1,2,4,8,16", "kdparam: comma-separated temperatures of the grid.",
           all_of(nonempty_list("1,2,4,8,16"), numbers(lambda t: t > 0, "temperature must be > 0"))),
     Param("alphas", "str", "0.1,0.5,0.7,0.9,1.0", "kdparam: comma-separated alphas of the grid.",
           all_of(nonempty_list("0.1,0.5,0.9"), numbers(lambda a: 0 <= a <= 1, "alpha must be in [0, 1]"))),
     LS, *OPTIM, *RUNTIME),
    "kd_mlflow.strategies:kdparam", terms=("ce", "kd"))
