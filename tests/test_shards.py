"""Shard format: round trip, bounds, rank splits, teacher fidelity, faults, resumable precompute."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from cluster.precompute import precompute
from dard.data import load_splits
from dard.shards import ShardError, ShardReader, read_manifest, verify
from tests.conftest import digits_config, load

EPS = 0.2


@pytest.fixture(scope="module")
def teacher_path(trained_models):
    return trained_models["teacher"]["model_path"]


def small_cfg(tmp_path, n=150):
    return digits_config(tmp_path, data={"limit_train": n}, attack={"steps": 2})


@pytest.fixture(scope="module")
def shard_dir(teacher_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shards")
    result = precompute(small_cfg(tmp), teacher_path, str(tmp / "s"), views=2, rows_per_part=64, use_ray=False)
    assert result.manifest is not None and result.computed_parts == [0, 1, 2]
    return tmp / "s"


def test_round_trip_bounds_and_manifest(shard_dir, tmp_path):
    reader = ShardReader(str(shard_dir))
    m = reader.manifest
    assert m["views"] == 2 and m["rows"] == 300 and len(m["parts"]) == 3 and len(m["teacher"]["sha256"]) == 64
    assert m["attack"]["eps"] == EPS and m["dataset"] == "digits" and m["image_shape"] == [1, 8, 8]
    splits = load_splits(small_cfg(tmp_path).data)
    for view in (0, 1):
        batch = reader.take(reader.rows_by_view[view])
        assert torch.equal(batch.index, torch.arange(150)) and torch.equal(batch.label, splits.train.labels[:150])
        total = batch.x.to(torch.int16) + batch.delta.to(torch.int16)
        assert total.min() >= 0 and total.max() <= 255
        assert batch.delta.abs().max() <= int(EPS * 255) and batch.delta.abs().max() > 0
        # the stored natural view is the crop/flip of the real image described by the stored params
        from dard.data import AugmentParams, apply_augment

        table = reader.table.take(reader.rows_by_view[view])
        params = AugmentParams(torch.from_numpy(table.column("crop_dx").to_numpy().astype(np.int64)),
                               torch.from_numpy(table.column("crop_dy").to_numpy().astype(np.int64)),
                               torch.from_numpy(table.column("flip").to_numpy(zero_copy_only=False)))
        assert torch.equal(batch.x, apply_augment(splits.train.images[:150], params, 1))


def test_teacher_logits_match_a_fresh_forward(shard_dir, teacher_path):
    teacher = load(teacher_path)
    reader = ShardReader(str(shard_dir))
    b = reader.take(reader.rows_by_view[1][:100]).to_train_batch()
    with torch.no_grad():
        nat, adv = teacher(b.x), teacher(b.x_teacher_adv)
    assert torch.allclose(b.teacher_logits, nat, atol=2e-2, rtol=2e-3)
    assert torch.allclose(b.teacher_logits_adv, adv, atol=2e-2, rtol=2e-3)
    # the DPGD views really attack the teacher
    assert (adv.argmax(1) == b.y).float().mean() < (nat.argmax(1) == b.y).float().mean()


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_are_disjoint_and_cover_the_dataset(shard_dir, world):
    reader = ShardReader(str(shard_dir), check="none")
    for epoch in (0, 1):
        parts = [reader.rank_rows(epoch, r, world, seed=5) for r in range(world)]
        samples = [set(reader.table.column("index").to_numpy()[p]) for p in parts]
        assert sum(len(s) for s in samples) == 150 and set().union(*samples) == set(range(150))
        views = set(reader.table.column("view").to_numpy()[np.concatenate(parts)])
        assert views == {epoch % 2}
        steps = [sum(1 for _ in reader.batches(epoch, 16, r, world, seed=5)) for r in range(world)]
        assert len(set(steps)) == 1 and steps[0] == reader.steps_per_epoch(16, world)
    assert not np.array_equal(reader.rank_rows(0, 0, 2, 5), reader.rank_rows(2, 0, 2, 5))  # reshuffled per epoch


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_faults_name_the_file(shard_dir, tmp_path):
    d = _copy(shard_dir, tmp_path / "trunc")
    part = d / "part-00001.arrow"
    part.write_bytes(part.read_bytes()[:-100])
    with pytest.raises(ShardError, match="part-00001.arrow.*truncated"):
        ShardReader(str(d))

    d = _copy(shard_dir, tmp_path / "flip")
    data = bytearray((d / "part-00002.arrow").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / "part-00002.arrow").write_bytes(bytes(data))
    with pytest.raises(ShardError, match="part-00002.arrow.*sha256"):
        verify(str(d))

    d = _copy(shard_dir, tmp_path / "missing")
    (d / "part-00000.arrow").unlink()
    with pytest.raises(ShardError, match="part-00000.arrow: missing part"):
        ShardReader(str(d))

    d = _copy(shard_dir, tmp_path / "manifest")
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match="manifest.json: corrupt manifest"):
        read_manifest(str(d))
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    manifest["format_version"] = 99
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="format version 99"):
        read_manifest(str(d))
    with pytest.raises(ShardError, match="no manifest"):
        read_manifest(str(tmp_path / "nowhere"))


def test_wrong_run_is_refused(shard_dir):
    reader = ShardReader(str(shard_dir), check="fast")
    reader.check_compatible(dataset="digits", num_classes=10, eps=EPS)
    with pytest.raises(ShardError, match="dataset 'digits' \\(run: 'cifar10'\\).*num_classes 10 \\(run: 100\\)"):
        reader.check_compatible(dataset="cifar10", num_classes=100)
    with pytest.raises(ShardError, match="attack eps"):
        reader.check_compatible(dataset="digits", num_classes=10, eps=0.1)
    with pytest.raises(ShardError, match="teacher sha256"):
        reader.check_compatible(dataset="digits", num_classes=10, teacher_sha256="0" * 64)


def test_interrupted_precompute_resumes_without_recomputing(teacher_path, tmp_path, shard_dir):
    cfg = small_cfg(tmp_path)
    out = str(tmp_path / "s")
    first = precompute(cfg, teacher_path, out, views=2, rows_per_part=64, max_parts=2, use_ray=False)
    assert first.manifest is None and first.computed_parts == [0, 1]
    assert not (tmp_path / "s" / "manifest.json").exists()
    # corrupt a finished part: it must be rebuilt, the other finished one kept
    (tmp_path / "s" / "part-00001.arrow").write_bytes(b"broken")
    second = precompute(cfg, teacher_path, out, views=2, rows_per_part=64, use_ray=False)
    assert second.skipped_parts == [0] and second.computed_parts == [1, 2]
    verify(out)
    # deterministic: the same rows as a run that was never interrupted
    a = ShardReader(out, check="none").manifest["parts"]
    b = ShardReader(str(shard_dir), check="none").manifest["parts"]
    assert [x["sha256"] for x in a] == [x["sha256"] for x in b]
    third = precompute(cfg, teacher_path, out, views=2, rows_per_part=64, use_ray=False)
    assert third.computed_parts == [] and third.skipped_parts == [0, 1, 2]


def test_wrong_teacher_fails_before_any_work(tmp_path):
    from dard.models import build, save_model

    path = save_model(tmp_path / "c100.pt", build("cnn_small", 100, 1), arch="cnn_small", num_classes=100,
                      in_channels=1, dataset="digits")
    with pytest.raises(ValueError, match="num_classes=10"):
        precompute(small_cfg(tmp_path), path, str(tmp_path / "s"), use_ray=False)
    assert not (tmp_path / "s").exists()


BUILD_WITHOUT_RAY = """
import sys
sys.modules["ray"] = None  # any `import ray` now fails
sys.modules["cluster"] = None
from dard.config import Config
from dard.precompute import build_shards
cfg = Config.for_dataset("digits", data={"limit_train": 40}, attack={"steps": 1}, run={"progress": False})
result = build_shards(cfg, sys.argv[1], sys.argv[2], views=1, rows_per_part=32)
assert not [m for m in sys.modules if m.split(".")[0] in ("ray", "cluster") and sys.modules[m] is not None]
print(result.manifest["rows"], result.computed_parts)
"""


def test_dard_builds_shards_without_ray_or_cluster(teacher_path, tmp_path):
    run = subprocess.run([sys.executable, "-c", BUILD_WITHOUT_RAY, teacher_path, str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["40", "[0,", "1]"]
    assert verify(str(tmp_path / "s"))["rows"] == 40


def test_rows_are_checked_against_the_runs_split_whatever_the_manifest_says(teacher_path, tmp_path, capsys):
    """Test-split shards whose manifest was edited to say 'train' (or another split seed) are refused
    by their rows, naming the split the rows really are; `dard shards inspect` says so too."""
    from dard.cli import main
    from dard.training import open_shards

    cfg = digits_config(tmp_path, attack={"steps": 2})
    precompute(cfg, teacher_path, str(tmp_path / "t"), views=1, split="test", use_ray=False)
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    (tmp_path / "t" / "manifest.json").write_text(json.dumps({**manifest, "split": "train"}))
    with pytest.raises(ShardError, match=r"not the run's train samples \(they are its 'test' split; the manifest "
                                         r"says 'train'\)"):
        open_shards(str(tmp_path / "t"), cfg)
    assert main(["shards", "inspect", str(tmp_path / "t")]) == 2
    assert "they are its 'test' split" in capsys.readouterr().err
    # train shards of split seed 0 claimed for a run with split seed 1: the rows are nobody's
    precompute(cfg, teacher_path, str(tmp_path / "s0"), views=1, use_ray=False)
    manifest = json.loads((tmp_path / "s0" / "manifest.json").read_text())
    manifest["data"]["split_seed"] = 1
    (tmp_path / "s0" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="match none of the run's splits"):
        open_shards(str(tmp_path / "s0"), cfg.updated(data={"split_seed": 1}))
    assert main(["distill", "--shards", str(tmp_path / "s0"), "--set", "data.split_seed=1", "--steps", "2",
                 "--epochs", "1", "--out", str(tmp_path / "x.pt"), "--no-progress"]) == 2
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "x-run").exists()


def test_a_manifest_edited_after_precompute_is_refused_by_its_fingerprint(shard_dir, tmp_path, capsys):
    """Fields the rows cannot show (the teacher that made them, the attack of the DPGD views) are
    held by the manifest's fingerprint, recomputed from its own fields on every full check."""
    import shutil

    from dard.cli import main
    from dard.training import open_shards

    copy = tmp_path / "s"
    shutil.copytree(shard_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    assert main(["shards", "inspect", str(copy)]) == 0  # as built: every check passes
    capsys.readouterr()
    manifest["teacher"]["sha256"] = "0" * 64  # claim another teacher
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="the manifest's fields were edited after the shards were built"):
        open_shards(str(copy), small_cfg(tmp_path))
    assert main(["shards", "inspect", str(copy)]) == 2
    assert "fingerprint no longer matches" in capsys.readouterr().err
