import pytest
import torch
import torch.nn.functional as F

from dard.attacks import (bim, ce_loss, cw_inf, dice_loss, dpgd, dpgd_inner_loss, fgsm, pgd, projected_gradient_attack,
                          targeted_pgd, trades_pgd)
from dard.attacks.autoattack import autoattack
from dard.attacks.registry import ATTACKS, AttackParams
from dard.config import EVAL_ATTACKS
from tests.conftest import load

EPS, STEP = 0.2, 0.05


def all_attacks():
    return {
        "fgsm": lambda m, x, y: fgsm(m, x, y, EPS),
        "bim": lambda m, x, y: bim(m, x, y, EPS, STEP, 2),
        "pgd": lambda m, x, y: pgd(m, x, y, EPS, STEP, 2),
        "targeted": lambda m, x, y: targeted_pgd(m, x, y, EPS, STEP, 2),
        "tpgd": lambda m, x, y: trades_pgd(m, x, EPS, STEP, 2),
        "cw": lambda m, x, y: cw_inf(m, x, y, EPS, STEP, 2),
        "dpgd": lambda m, x, y: dpgd(m, x, y, eps=EPS, step_size=STEP, steps=2),
        "dpgd_soft_apgd": lambda m, x, y: dpgd(m, x, F.softmax(torch.randn(len(y), 10), 1), eps=EPS, step_size=STEP,
                                               steps=4, schedule="apgd", loss="dice+ce"),
        "dpgd_cosine_mask": lambda m, x, y: dpgd(m, x, y, eps=EPS, step_size=STEP, steps=2, schedule="cosine",
                                                 channel_mask=(0,), loss="cw"),
    }


@pytest.mark.parametrize("name", list(all_attacks()))
def test_attack_stays_in_ball_and_range_and_restores_mode(name, tiny_model, digits_test):
    x, y = digits_test[0][:64], digits_test[1][:64]
    tiny_model.train()
    x_adv = all_attacks()[name](tiny_model, x, y)
    assert tiny_model.training  # mode restored
    assert all(p.grad is None for p in tiny_model.parameters())  # nothing leaked into parameters
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    if name != "dpgd_cosine_mask":  # the mask zeroes the only channel: no movement (checked below)
        assert (x_adv - x).abs().max() > 0


def test_channel_mask_blocks_that_channel():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 10)).eval()
    x, y = torch.rand(8, 3, 4, 4), torch.randint(0, 10, (8,))
    x_adv = dpgd(model, x, y, eps=0.1, step_size=0.05, steps=3, channel_mask=(1,), random_start=False)
    assert torch.equal(x_adv[:, 1], x[:, 1]) and (x_adv[:, 0] - x[:, 0]).abs().max() > 0


def test_pgd_loss_increases_over_steps(trained_models, digits_test):
    """Mean CE after k PGD steps is non-decreasing in k (same start) on a trained model."""
    model = load(trained_models["trades"]["model_path"])
    x, y = digits_test[0][:200], digits_test[1][:200]
    losses = []
    for steps in (1, 2, 4, 8):
        x_adv = projected_gradient_attack(model, x, y, eps=EPS, step_size=STEP, steps=steps,
                                          generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            losses.append(ce_loss(model(x_adv), y).mean().item())
    assert all(b >= a - 1e-3 for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] > losses[0]


def test_dice_loss_matches_hand_computation():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    q = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    # row 0: 1 - 2*0.7/(0.49+0.04+0.01 + 1) = 1 - 1.4/1.54
    # row 1: 1 - 2*(0.02+0.03+0.40)/((0.01+0.01+0.64) + (0.04+0.09+0.25)) = 1 - 0.9/1.04
    expected = torch.tensor([1 - 1.4 / 1.54, 1 - 0.9 / 1.04])
    assert torch.allclose(dice_loss(p, q), expected, atol=1e-6)
    assert torch.allclose(dice_loss(q, q), torch.zeros(2), atol=1e-6)


def test_soft_target_dpgd_ascends_the_divergence(trained_models, digits_test):
    """Against a teacher soft label, DPGD raises the Dice loss to that label (vs the clean input)."""
    model = load(trained_models["trades"]["model_path"])
    x = digits_test[0][:128]
    with torch.no_grad():
        target = F.softmax(model(x), 1)
    x_adv = dpgd(model, x, target, eps=EPS, step_size=STEP, steps=5, random_start=False)
    loss = dpgd_inner_loss("dice")
    with torch.no_grad():
        assert loss(model(x_adv), target).mean() > loss(model(x), target).mean() + 0.05


def test_targeted_pgd_reaches_its_targets(trained_models, digits_test):
    model = load(trained_models["natural"]["model_path"])
    x, y = digits_test[0][:100], digits_test[1][:100]
    targets = (y + 1) % 10
    x_adv = targeted_pgd(model, x, y, EPS, STEP, 10, target_classes=targets)
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == targets).float().mean() > 0.5


def test_segpgd_weighting_is_a_noop_under_sign_steps_until_fooled():
    """docs/design.md §3 trap: positive per-sample weights cancel in sign(); equal runs while nothing is fooled."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    x = torch.rand(16, 1, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)  # all correct at the start
    a = dpgd(model, x, y, eps=1e-3, step_size=5e-4, steps=2, random_start=False)
    b = dpgd(model, x, y, eps=1e-3, step_size=5e-4, steps=2, random_start=False, segpgd_weighting=True)
    with torch.no_grad():
        assert (model(a).argmax(1) == y).all()  # tiny eps: nobody fooled, weights all positive
    assert torch.equal(a, b)


def test_autoattack_runs_on_a_small_subset(trained_models, digits_test):
    model = load(trained_models["trades"]["model_path"])
    x, y = digits_test[0][:24], digits_test[1][:24]
    result = autoattack(model, x, y, eps=EPS, num_classes=10, batch_size=24)
    with torch.no_grad():
        natural = (model(x).argmax(1) == y)
    assert result.robust.shape == (24,) and result.robust.dtype == torch.bool
    assert not (result.robust & ~natural).any()  # robust implies naturally correct
    assert (result.x_adv - x).abs().max() <= EPS + 1e-5
    pgd_correct = model(pgd(model, x, y, EPS, STEP, 20)).argmax(1) == y
    assert result.accuracy <= pgd_correct.float().mean().item() + 1 / 24
    assert "apgd-ce" in result.per_attack_accuracy
    # FAB-T calls backward: nothing may land in the parameters, and their flags come back as they were
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert "fab-t" in result.per_attack_accuracy  # FAB-T really ran (points stayed robust after APGD)


@pytest.mark.parametrize("name", [a for a in EVAL_ATTACKS if a != "autoattack"])
def test_protocol_attacks_have_one_call_shape(name, tiny_model, digits_test):
    """Every attack of the evaluation protocol: attack(model, x, y, params) -> x_adv, seeded."""
    x, y = digits_test[0][:32], digits_test[1][:32]
    params = AttackParams(EPS, STEP, seed=3)
    first, again = ATTACKS[name](tiny_model, x, y, params), ATTACKS[name](tiny_model, x, y, params)
    assert torch.equal(first, again)  # the same call, the same result (no shared generator state)
    assert first.shape == x.shape and (first - x).abs().max() <= EPS + 1e-6 and first.min() >= 0 and first.max() <= 1
    if name == "square":  # gradient-free: x where it did not fool the model (this untrained one predicts one class)
        with torch.no_grad():
            kept = tiny_model(first).argmax(1) == tiny_model(x).argmax(1)
        assert torch.equal(first[kept], x[kept])
    else:
        assert (name == "natural") == torch.equal(first, x)
