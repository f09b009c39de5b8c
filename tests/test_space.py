import pytest

from dard.config import Config
from tuning.space import PRESETS, SpaceError, apply, load_space, to_tune, validate_space


def test_presets_load_and_convert():
    for name in PRESETS:
        space = load_space(name)
        tuned = to_tune(space)
        assert set(tuned) == set(space)


def test_yaml_space(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("temperature: {type: loguniform, low: 1, high: 8}\nw_rob: 0.5\ndivergence: {type: choice, values: [kl]}\n")
    assert load_space(path)["w_rob"] == 0.5


@pytest.mark.parametrize("space,message", [
    ({}, "empty"),
    ({"temperature": {"type": "uniform", "low": 3, "high": 3}}, "temperature: empty range"),
    ({"temperature": {"type": "loguniform", "low": 0, "high": 3}}, "temperature: loguniform needs low > 0"),
    ({"temperature": -1.0}, "temperature: must be > 0"),
    ({"temperature": {"type": "uniform", "low": -2, "high": 3}}, "temperature: must be > 0"),
    ({"w_adv": {"type": "uniform", "low": -1, "high": 1}}, "w_adv: must be >= 0"),
    ({"beta": 1.0}, "beta: unknown parameter"),
    ({"divergence": {"type": "choice", "values": ["kl", "l2"]}}, "divergence: unknown 'l2'"),
    ({"divergence": {"type": "choice", "values": []}}, "divergence: choice needs a non-empty list"),
    ({"lr": {"type": "normal", "mu": 0}}, "lr: unknown distribution type"),
])
def test_bad_spaces_are_clear_errors(space, message):
    with pytest.raises(SpaceError, match=message):
        validate_space(space)


def test_unknown_preset():
    with pytest.raises(SpaceError, match="unknown search space 'nope'"):
        load_space("nope")


def test_apply_normalises_the_three_weights():
    cfg = apply(Config.for_dataset("digits"), {"rob_target": "teacher_nat", "w_adv": 1.0, "w_rob": 2.0, "w_nat": 1.0,
                                                "w_ce": 0.3, "temperature": 4.0, "dpgd_schedule": "apgd", "lr": 0.01})
    assert (cfg.loss.w_adv, cfg.loss.w_rob, cfg.loss.w_nat) == pytest.approx((0.25, 0.5, 0.25))
    assert cfg.loss.w_ce == 0.3 and cfg.loss.temperature == 4.0 and cfg.attack.dpgd_schedule == "apgd"
    assert cfg.optim.lr == 0.01 and cfg.loss.method == "dard"
    zero = apply(Config.for_dataset("digits"), {"rob_target": "teacher_nat", "w_adv": 0.0, "w_rob": 0.0, "w_nat": 0.0})
    assert zero.loss.w_rob == 1.0
    # a hard-label backbone (SAT's CE at x_s, the digits default) sets the scale: weights stay as drawn
    sat = apply(Config.for_dataset("digits"), {"rob_target": "label", "w_adv": 1.5, "w_nat": 0.25})
    assert (sat.loss.w_adv, sat.loss.w_rob, sat.loss.w_nat) == (1.5, 1.0, 0.25)
