"""Each loss against a hand computation on a 2x3 logits example."""
import math

import pytest
import torch
from torch import nn

from dard.config import AttackConfig, LossConfig
from dard.data import TrainBatch
from dard.losses import ard, dard, divergence, natural, rslad, sat, trades

S = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.5, 1.5]])  # student logits
T = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 2.0]])  # teacher logits
Y = torch.tensor([0, 2])


def softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def kl_hand(t_logits, s_logits, tau=1.0):
    """mean over rows of sum_c p_t log(p_t / p_s), p = softmax(logits / tau)."""
    total = 0.0
    for t_row, s_row in zip(t_logits.tolist(), s_logits.tolist()):
        pt, ps = softmax([v / tau for v in t_row]), softmax([v / tau for v in s_row])
        total += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    return total / len(t_logits)


def dice_hand(t_logits, s_logits, tau=1.0):
    total = 0.0
    for t_row, s_row in zip(t_logits.tolist(), s_logits.tolist()):
        q, p = softmax([v / tau for v in t_row]), softmax([v / tau for v in s_row])
        total += 1 - 2 * sum(a * b for a, b in zip(p, q)) / (sum(a * a for a in p) + sum(b * b for b in q))
    return total / len(t_logits)


def ce_hand(s_logits, labels):
    return sum(-math.log(softmax(r)[c]) for r, c in zip(s_logits.tolist(), labels.tolist())) / len(labels)


class Fixed(nn.Module):
    """Returns stored logits for any input: the adversarial and natural forwards give the same S."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, x):
        return self.logits * torch.ones(x.shape[0], 1)


X = torch.rand(2, 1, 4, 4)
ATT = AttackConfig(eps=0.1, step_size=0.05, steps=1)


def test_divergence_kl_dice_and_temperature_scaling():
    assert divergence(S, T, 1.0, "kl").item() == pytest.approx(kl_hand(T, S), rel=1e-5)
    assert divergence(S, T, 1.0, "dice").item() == pytest.approx(dice_hand(T, S), rel=1e-5)
    tau = 4.0
    assert divergence(S, T, tau, "kl").item() == pytest.approx(tau ** 2 * kl_hand(T, S, tau), rel=1e-5)
    assert divergence(S, T, tau, "dice").item() == pytest.approx(tau ** 2 * dice_hand(T, S, tau), rel=1e-5)


def test_natural_and_sat_are_cross_entropy():
    batch = TrainBatch(X, Y)
    assert natural(Fixed(S), batch, LossConfig(), ATT).loss.item() == pytest.approx(ce_hand(S, Y), rel=1e-5)
    assert sat(Fixed(S), batch, LossConfig(), ATT).loss.item() == pytest.approx(ce_hand(S, Y), rel=1e-5)


def test_trades_with_identical_adversarial_logits_is_ce():
    # S(x') = S(x): the KL term vanishes, leaving CE.
    assert trades(Fixed(S), TrainBatch(X, Y), LossConfig(trades_beta=6.0), ATT).loss.item() == pytest.approx(
        ce_hand(S, Y), rel=1e-5)


def test_trades_kl_term_by_hand():
    class TwoFaced(nn.Module):  # natural input -> S, anything else -> T
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            is_nat = torch.isclose(x, X).flatten(1).all(1, keepdim=True)
            return torch.where(is_nat, S, T) + self.w

    result = trades(TwoFaced(), TrainBatch(X, Y), LossConfig(trades_beta=6.0), ATT)
    assert result.loss.item() == pytest.approx(ce_hand(S, Y) + 6.0 * kl_hand(S, T), rel=1e-4)


def test_ard_and_rslad_by_hand():
    batch = TrainBatch(X, Y, teacher_logits=T)
    tau = 30.0
    got = ard(Fixed(S), batch, LossConfig(ard_alpha=1.0, ard_temperature=tau), ATT).loss.item()
    assert got == pytest.approx(tau ** 2 * kl_hand(T, S, tau), rel=1e-3)  # float32: tiny KL x 900
    got = ard(Fixed(S), batch, LossConfig(ard_alpha=0.5, ard_temperature=1.0), ATT).loss.item()
    assert got == pytest.approx(0.5 * kl_hand(T, S) + 0.5 * ce_hand(S, Y), rel=1e-5)
    got = rslad(Fixed(S), batch, LossConfig(), ATT).loss.item()
    assert got == pytest.approx(5 / 6 * kl_hand(T, S) + 1 / 6 * kl_hand(T, S), rel=1e-5)


def test_dard_terms_by_hand():
    T_adv = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.0, 0.0]])
    batch = TrainBatch(X, Y, teacher_logits=T, x_teacher_adv=X.clone(), teacher_logits_adv=T_adv)
    cfg = LossConfig(w_adv=0.3, w_rob=0.5, w_nat=0.2, w_ce=0.1, temperature=2.0, divergence="kl")
    result = dard(Fixed(S), batch, cfg, ATT)
    tau2 = 4.0
    expected = (0.3 * tau2 * kl_hand(T_adv, S, 2.0) + 0.5 * tau2 * kl_hand(T, S, 2.0) + 0.2 * tau2 * kl_hand(T, S, 2.0)
                + 0.1 * ce_hand(S, Y))
    assert result.loss.item() == pytest.approx(expected, rel=1e-5)
    assert set(result.terms) == {"kd_adv", "kd_rob", "kd_nat", "ce"}
    dice_cfg = LossConfig(w_adv=1.0, w_rob=0.0, w_nat=0.0, temperature=1.0, divergence="dice")
    assert dard(Fixed(S), batch, dice_cfg, ATT).loss.item() == pytest.approx(dice_hand(T_adv, S), rel=1e-5)


def test_temperature_one_vs_tau_differ_by_tau_squared_scaling():
    batch = TrainBatch(X, Y, teacher_logits=T)
    one = dard(Fixed(S), batch, LossConfig(w_adv=0, w_rob=0, w_nat=1.0, temperature=1.0), ATT).loss.item()
    four = dard(Fixed(S), batch, LossConfig(w_adv=0, w_rob=0, w_nat=1.0, temperature=4.0), ATT).loss.item()
    assert one == pytest.approx(kl_hand(T, S, 1.0), rel=1e-5)
    assert four == pytest.approx(16 * kl_hand(T, S, 4.0), rel=1e-5)


def test_distillation_without_teacher_is_a_clear_error():
    with pytest.raises(ValueError, match="needs teacher outputs"):
        dard(Fixed(S), TrainBatch(X, Y), LossConfig(), ATT)


class TwoFaced(nn.Module):
    """Natural input X -> ``nat`` logits, any other input (an adversarial example) -> ``adv``."""

    def __init__(self, nat, adv):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.nat, self.adv = nat, adv

    def forward(self, x):
        is_nat = torch.isclose(x, X).flatten(1).all(1, keepdim=True)
        return torch.where(is_nat, self.nat, self.adv) + self.w


def test_dard_rob_target_self_is_trades_plus_teacher_terms():
    # S(x) = S, S(x_s) = T: the robust term is beta * KL(S(x) || S(x_s)), no teacher at x_s.
    T_adv = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.0, 0.0]])
    batch = TrainBatch(X, Y, teacher_logits=T, x_teacher_adv=X + 0.05, teacher_logits_adv=T_adv)
    cfg = LossConfig(rob_target="self", w_adv=0.0, w_rob=1.0, w_nat=0.0, w_ce=1.0, trades_beta=6.0)
    got = dard(TwoFaced(S, T), batch, cfg, ATT)
    assert got.loss.item() == pytest.approx(ce_hand(S, Y) + 6.0 * kl_hand(S, T), rel=1e-4)
    # ...which is exactly TRADES' objective on the same student
    assert got.loss.item() == pytest.approx(trades(TwoFaced(S, T), batch, LossConfig(trades_beta=6.0), ATT).loss.item(),
                                            rel=1e-5)
    # plus DARD's precomputed terms: w_adv on T(x_d) (the student sees x_d -> T), w_nat on T(x)
    cfg = LossConfig(rob_target="self", w_adv=1 / 3, w_rob=1.0, w_nat=1 / 6, w_ce=1.0, trades_beta=6.0)
    got = dard(TwoFaced(S, T), batch, cfg, ATT)
    expected = ce_hand(S, Y) + 6.0 * kl_hand(S, T) + 1 / 3 * kl_hand(T_adv, T) + 1 / 6 * kl_hand(T, S)
    assert got.loss.item() == pytest.approx(expected, rel=1e-4)
    assert set(got.terms) == {"kd_adv", "kd_rob", "kd_nat", "ce"}


def test_dard_w_ce_adv_is_cross_entropy_at_the_student_adversarial_example():
    S_adv = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
    batch = TrainBatch(X, Y, teacher_logits=T)
    for target in ("teacher_nat", "self"):
        cfg = LossConfig(rob_target=target, w_adv=0.0, w_rob=0.0, w_nat=0.0, w_ce_adv=0.5)
        got = dard(TwoFaced(S, S_adv), batch, cfg, ATT)
        assert got.loss.item() == pytest.approx(0.5 * ce_hand(S_adv, Y), rel=1e-5), target
        assert set(got.terms) == {"ce_adv"}
    cfg = LossConfig(w_adv=0.0, w_rob=0.5, w_nat=0.0, w_ce_adv=2.0)  # teacher_nat: target T(x)
    got = dard(TwoFaced(S, S_adv), batch, cfg, ATT)
    assert got.loss.item() == pytest.approx(0.5 * kl_hand(T, S_adv) + 2.0 * ce_hand(S_adv, Y), rel=1e-5)


def test_dard_rob_target_teacher_adv_queries_the_teacher_at_x_s():
    T_at_xs = torch.tensor([[0.0, 0.0, 4.0], [4.0, 0.0, 0.0]])
    S_adv = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
    teacher = TwoFaced(T, T_at_xs)  # the online teacher gives T at x and T_at_xs at the student's x_s
    batch = TrainBatch(X, Y, teacher_logits=T, online_teacher=teacher)
    cfg = LossConfig(rob_target="teacher_adv", w_adv=0.0, w_rob=1.0, w_nat=0.0, temperature=2.0)
    got = dard(TwoFaced(S, S_adv), batch, cfg, ATT)
    assert got.loss.item() == pytest.approx(4.0 * kl_hand(T_at_xs, S_adv, 2.0), rel=1e-5)
    # differs from the precomputed-target version (T(x)), which is the point of the knob
    base = dard(TwoFaced(S, S_adv), batch, LossConfig(w_adv=0.0, w_rob=1.0, w_nat=0.0, temperature=2.0), ATT)
    assert base.loss.item() == pytest.approx(4.0 * kl_hand(T, S_adv, 2.0), rel=1e-5)
    assert abs(base.loss.item() - got.loss.item()) > 0.05
    with pytest.raises(ValueError, match="teacher_adv"):
        dard(TwoFaced(S, S_adv), TrainBatch(X, Y, teacher_logits=T), cfg, ATT)


def test_dard_rob_target_label_is_sat_plus_teacher_terms():
    # R = CE(S(x_s), y): on the two-faced student, CE of the adversarial logits by hand
    S_adv, T_adv = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0]]), torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.0, 0.0]])
    batch = TrainBatch(X, Y, teacher_logits=T, x_teacher_adv=X + 0.05, teacher_logits_adv=T_adv)
    cfg = LossConfig(rob_target="label", w_adv=0.0, w_rob=1.0, w_nat=0.0)
    assert dard(TwoFaced(S, S_adv), batch, cfg, ATT).loss.item() == pytest.approx(ce_hand(S_adv, Y), rel=1e-5)
    # plus the teacher's soft labels on its DPGD view (the student sees x_d -> S_adv) and on x
    cfg = LossConfig(rob_target="label", w_adv=1.0, w_rob=1.0, w_nat=0.5)
    got = dard(TwoFaced(S, S_adv), batch, cfg, ATT)
    expected = ce_hand(S_adv, Y) + kl_hand(T_adv, S_adv) + 0.5 * kl_hand(T, S)
    assert got.loss.item() == pytest.approx(expected, rel=1e-4)
    assert set(got.terms) == {"kd_adv", "kd_rob", "kd_nat"}
    # x_s is SAT's own PGD-CE example: same random start, same loss as `sat` on a real model
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    att = AttackConfig(eps=0.1, step_size=0.05, steps=3)
    torch.manual_seed(0)
    got = dard(model, batch, LossConfig(rob_target="label", w_adv=0.0, w_rob=1.0, w_nat=0.0), att).loss.item()
    torch.manual_seed(0)
    assert got == pytest.approx(sat(model, batch, LossConfig(), att).loss.item(), rel=1e-6)
    torch.manual_seed(0)
    other = dard(model, batch, LossConfig(rob_target="self", w_adv=0.0, w_rob=0.0, w_nat=0.0, w_ce_adv=1.0),
                 att).loss.item()
    assert other != pytest.approx(got, rel=1e-6)  # the KL attack finds another x_s
