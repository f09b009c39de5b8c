import json

import pytest
import torch

from dard.checkpoint import CheckpointError, load_checkpoint
from dard.training import fit
from tests.conftest import digits_config, load


def test_adversarial_training_is_measurably_robust(trained_models):
    """TRADES vs natural training of the same small CNN on digits: a clear PGD-10 gap."""
    nat, rob = trained_models["natural"], trained_models["trades"]
    assert nat["val_natural_acc"] > 0.85
    assert rob["val_pgd_acc"] > nat["val_pgd_acc"] + 0.15, (nat, rob)


def test_resume_matches_an_uninterrupted_run(tmp_path):
    base = dict(loss={"method": "trades"}, optim={"epochs": 3}, data={"limit_train": 256},
                attack={"steps": 2}, run={"eval_limit": 64})
    straight = fit(digits_config(tmp_path / "a", **base))
    class Interrupted(Exception):
        pass

    def crash_after_second_epoch(epoch, metrics):
        if epoch == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        fit(digits_config(tmp_path / "b", **base), on_epoch_end=crash_after_second_epoch)
    resumed = fit(digits_config(tmp_path / "b", **base), resume=True)
    a, b = load(straight["model_path"]), load(resumed["model_path"])
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(va.float(), vb.float(), atol=1e-5), k
    lines = [json.loads(l) for l in (tmp_path / "b" / "history.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [0, 1, 2]


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable checkpoint"):
        load_checkpoint(tmp_path / "checkpoint.pt")


def test_distillation_needs_a_teacher(tmp_path):
    with pytest.raises(ValueError, match="--teacher"):
        fit(digits_config(tmp_path, loss={"method": "dard"}, optim={"epochs": 1}))


@pytest.mark.slow
def test_dard_student_is_more_robust_than_a_natural_student(trained_models, tmp_path):
    teacher = trained_models["teacher"]["model_path"]
    dard = fit(digits_config(tmp_path / "dard", loss={"method": "dard"}, optim={"epochs": 6}), teacher_path=teacher)
    assert dard["val_pgd_acc"] > trained_models["natural"]["val_pgd_acc"] + 0.1, dard
    meta = torch.load(dard["model_path"], weights_only=True)["meta"]
    assert meta["teacher"]["arch"] == "cnn_medium" and len(meta["teacher"]["sha256"]) == 64


def test_the_shipped_model_is_the_epoch_of_best_validation_robust_accuracy(tmp_path, monkeypatch):
    """Adversarial training overfits robustly: the model file holds the epoch whose validation
    robust accuracy was best (here, scripted: epoch 1 of 0-2), says which, and a resume keeps it."""
    import dard.engine

    scripted = iter([0.30, 0.50, 0.40, 0.30, 0.50, 0.40])
    monkeypatch.setattr(dard.engine, "validation_metrics",
                        lambda model, ds, cfg, limit=None: {"val_natural_acc": 0.9, "val_pgd_acc": 0.5,
                                                            "val_robust_acc": next(scripted), "val_samples": 10})
    weights = {}

    def keep(epoch, metrics):
        weights[epoch] = {k: v.clone() for k, v in load_checkpoint(tmp_path / "a" / "checkpoint.pt")["model"].items()}

    base = dict(loss={"method": "sat"}, optim={"epochs": 3}, data={"limit_train": 128}, attack={"steps": 1})
    result = fit(digits_config(tmp_path / "a", **base), on_epoch_end=keep)
    assert result["selected_epoch"] == 1 and result["val_robust_acc"] == 0.50
    saved = torch.load(result["model_path"], weights_only=True)
    assert saved["meta"]["selected_epoch"] == 1 and saved["meta"]["last_metrics"]["epoch"] == 2
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in weights[1].items())
    assert not all(torch.equal(saved["state_dict"][k], v) for k, v in weights[2].items())

    class Interrupted(Exception):
        pass

    def stop_after_second(epoch, metrics):
        if epoch == 1:
            raise Interrupted

    with pytest.raises(Interrupted):  # the same run, interrupted after epoch 1 and resumed: same choice
        fit(digits_config(tmp_path / "b", **base), on_epoch_end=stop_after_second)
    resumed = fit(digits_config(tmp_path / "b", **base), resume=True)
    again = torch.load(resumed["model_path"], weights_only=True)["state_dict"]
    assert resumed["selected_epoch"] == 1 and all(torch.equal(again[k], v) for k, v in weights[1].items())
