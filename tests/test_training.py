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
    assert meta["teacher"]["arch"] == "cnn_large" and len(meta["teacher"]["sha256"]) == 64
