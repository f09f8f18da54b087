"""Each mode declares its own parameters next to its code; CLI, MLproject, validation and
logged params come from the declarations, and a parameter added later does not make
earlier runs look different."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kd_mlflow.analysis.runs import select_runs, settings_match
from kd_mlflow.config import COMMON_FIELDS, Config, ConfigError, Param
from kd_mlflow.modes import MODES


def fake_run(run_id: str, params: dict, start: int, status: str = "FINISHED"):
    return SimpleNamespace(
        info=SimpleNamespace(run_id=run_id, run_name=run_id, status=status, start_time=start),
        data=SimpleNamespace(params={k: str(v) for k, v in params.items()}, metrics={"test_acc": 80.0},
                             tags={"mode": params["mode"], "teacher": "resnet20"}))


def test_config_keeps_only_common_fields_and_modes_declare_the_rest():
    for mode in MODES.values():
        own = {p.name for p in mode.params}
        assert own.isdisjoint(COMMON_FIELDS), mode.name
        assert set(mode.fields) - own <= set(COMMON_FIELDS), mode.name
    assert Config.for_mode("oh").oh_weight == 1e-3 and Config.for_mode("pkd").pkd_weight == 10.0
    assert Config.parameter("sfd_weight", "sfd").default == 0.3
    cfg = Config.for_mode("triplet", triplet_margin=0.3)
    assert cfg.triplet_margin == 0.3 and cfg.replace(triplet_margin=0.5).triplet_margin == 0.5
    assert cfg.params()["triplet_margin"] == 0.3


def test_a_typo_in_a_parameter_name_fails_at_construction():
    with pytest.raises(ConfigError, match="mode triplet has no parameter triplet_margn; its own parameters: alpha, "):
        Config.for_mode("triplet", triplet_margn=0.3)
    with pytest.raises(AttributeError, match="dkd_alhpa"):
        Config.for_mode("kd").dkd_alhpa


def test_a_parameter_the_mode_does_not_declare_is_refused_not_read_as_another_modes_default():
    # pkd_weight is pkd's: kd has none, neither as a value nor as a default
    with pytest.raises(ConfigError, match=r"mode kd has no parameter pkd_weight \(pkd_weight belongs to pkd\); "
                                          r"its own parameters: alpha, labeled_fraction, logit_standardization, "
                                          r"temperature"):
        Config.for_mode("kd", pkd_weight=5.0)
    with pytest.raises(AttributeError, match="mode 'kd' has no parameter 'pkd_weight'"):
        Config.for_mode("kd").pkd_weight
    # the three feature weights once shared the name beta: the old name says the new one
    for mode in ("oh", "pkd", "sfd"):
        with pytest.raises(ConfigError, match=rf"mode {mode} has no parameter beta \(beta is now {mode}_weight\)"):
            Config.for_mode(mode, beta=1.0)
    assert Config.for_mode("oh").oh_weight == 1e-3 and Config.for_mode("pkd").pkd_weight == 10.0
    # a strategy's stage keeps what the stage's mode declares, not the strategy's grid
    stage = Config.for_mode("kdparam", temperatures="2,4", alphas="0.5").replace(mode="kd", temperature=2.0)
    assert stage.temperature == 2.0 and stage.alpha == 0.9 and "temperatures" not in stage.method
    assert "temperatures" not in stage.params() and set(stage.params()) >= {"temperature", "alpha"}
    # a multi-run command's options reach the modes that take them
    assert Config.taken_by("kd", {"teachers": "a,b", "epochs": 3, "temperature": 2.0}) == {"epochs": 3,
                                                                                         "temperature": 2.0}


def test_validation_comes_from_the_declared_check():
    assert MODES["uda"].param("uda_threshold").check("uda_threshold", 2.0, None) == \
        "uda_threshold must be in [0, 1], got 2.0"
    with pytest.raises(ConfigError, match="rkd_angle_weight must be >= 0"):
        Config.for_mode("rkd", rkd_angle_weight=-1.0).validate()
    declared = Param("x", "float", 1.0, "help")
    assert declared.but(default=2.0).default == 2.0 and declared.default == 1.0


def test_a_parameter_an_older_run_lacks_counts_as_its_default():
    """A run logged before a parameter was added to its mode (here: every param of kd but
    one) still matches a config with that parameter at its default, and only then."""
    cfg = Config.for_mode("kd", epochs=3, seed=1)
    newest_param = MODES["kd"].params[-1].name
    old = {k: v for k, v in cfg.params().items() if k != newest_param}
    assert settings_match(fake_run("old", old, 1), cfg)
    changed = cfg.replace(**{newest_param: not cfg.params()[newest_param]}
                          if isinstance(cfg.params()[newest_param], bool) else {newest_param: "x"})
    assert not settings_match(fake_run("old", old, 1), changed)

    runs = [fake_run("old0", {**old, "seed": 0}, 1), fake_run("old1", {**old, "seed": 1}, 2),
            fake_run("new", {**cfg.params(), "seed": 2}, 3)]
    included, excluded, _ = select_runs(runs)
    assert [r.info.run_id for r in included] == ["old0", "old1", "new"] and not excluded
    odd = fake_run("odd", {**changed.params(), "seed": 3}, 4)
    included, excluded, _ = select_runs([*runs, odd])
    assert [e["run_id"] for e in excluded] == ["odd"] and "mode parameters" in excluded[0]["reason"]


def test_runs_logged_before_a_rename_compare_with_runs_after_it():
    """pkd's weight was logged as beta before it became pkd_weight: such runs match a config
    with the same weight, join the same comparison group, and a different weight still
    splits them off."""
    cfg = Config.for_mode("pkd", epochs=3)
    before = {("beta" if k == "pkd_weight" else k): v for k, v in cfg.params().items()}
    assert "pkd_weight" not in before and before["beta"] == 10.0
    assert settings_match(fake_run("before", before, 1), cfg)
    assert not settings_match(fake_run("before", before, 1), cfg.replace(pkd_weight=100.0))
    runs = [fake_run("before0", {**before, "seed": 0}, 1), fake_run("after1", {**cfg.params(), "seed": 1}, 2)]
    included, excluded, _ = select_runs(runs)
    assert [r.info.run_id for r in included] == ["before0", "after1"] and not excluded
    other = fake_run("other", {**before, "beta": 100.0, "seed": 2}, 3)
    included, excluded, _ = select_runs([*runs, other])
    assert [e["run_id"] for e in excluded] == ["other"] and "mode parameters" in excluded[0]["reason"]
