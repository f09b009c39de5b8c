"""Shard format: round trip, bounds, per-rank streams, teacher fidelity, faults, resumable precompute, pools."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch

from cluster.precompute import precompute
from dard.data import AugmentParams, apply_augment, load_splits
from dard.shards import ShardError, ShardSet, epoch_batches, rank_plan, read_manifest, verify
from dard.shards.shardset import _pixels, open_reader
from tests.conftest import HANG_S, digits_config, load

EPS = 0.2


@pytest.fixture(scope="module")
def teacher_path(trained_models):
    return trained_models["teacher"]["model_path"]


def small_cfg(tmp_path, n=150, **data):
    return digits_config(tmp_path, data={"limit_train": n, **data}, attack={"steps": 2})


@pytest.fixture(scope="module")
def shard_dir(teacher_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shards")
    result = precompute(small_cfg(tmp), teacher_path, str(tmp / "s"), views=2, rows_per_part=64, use_ray=False)
    assert result.manifest is not None and result.computed_parts == [0, 1, 2]
    return tmp / "s"


def view_rows(shards: ShardSet, view: int, kinds=("labeled",)) -> dict:
    """Every row of ``view`` (parts in manifest order), as Arrow columns."""
    batches = []
    for unit in shards.units(kinds, view):
        _, reader = open_reader(shards.path(unit.part))
        batches.append(shards.read_unit(unit, reader))
    table = pa.Table.from_batches(batches)
    return {name: table.column(name).combine_chunks() for name in table.schema.names}


def test_round_trip_bounds_and_manifest(shard_dir, tmp_path):
    shards = ShardSet.open(str(shard_dir))
    m = shards.manifest
    assert m["views"] == 2 and m["rows"] == 300 and len(m["parts"]) == 3 and len(m["teacher"]["sha256"]) == 64
    assert m["attack"]["eps"] == EPS and m["dataset"] == "digits" and m["image_shape"] == [1, 8, 8]
    assert m["samples"] == {"labeled": 150, "pool": 0} and m["classes"] == [str(d) for d in range(10)]
    # parts are a seeded permutation of the split, not ranges; units hold one view each, <= 1024 rows
    assert sorted(p["samples"] for p in m["parts"]) == [22, 64, 64]
    assert all(len({u["view"] for u in p["units"]}) == 2 for p in m["parts"])
    splits = load_splits(small_cfg(tmp_path).data)
    for view in (0, 1):
        cols = view_rows(shards, view)
        index = torch.from_numpy(cols["index"].to_numpy().copy())
        assert sorted(index.tolist()) == list(range(150)) and index.tolist() != list(range(150))
        labels = torch.from_numpy(cols["label"].to_numpy().astype(np.int64))
        assert torch.equal(labels, splits.train.labels[index]) and (cols["label_source"].to_numpy() == 0).all()
        x = _pixels(cols["x"], (1, 8, 8), np.uint8)
        delta = _pixels(cols["delta"], (1, 8, 8), np.int8)
        total = x.to(torch.int16) + delta.to(torch.int16)
        assert total.min() >= 0 and total.max() <= 255
        assert delta.abs().max() <= int(EPS * 255) and delta.abs().max() > 0
        # the stored natural view is the crop/flip of the real image described by the stored params
        params = AugmentParams(torch.from_numpy(cols["crop_dx"].to_numpy().astype(np.int64)),
                               torch.from_numpy(cols["crop_dy"].to_numpy().astype(np.int64)),
                               torch.from_numpy(cols["flip"].to_numpy(zero_copy_only=False)))
        assert torch.equal(x, apply_augment(splits.train.images[index], params, 0))
        confidence = cols["confidence"].to_numpy()
        assert ((confidence > 0.1) & (confidence <= 1)).all()


def test_teacher_logits_match_a_fresh_forward(shard_dir, teacher_path):
    teacher = load(teacher_path)
    shards = ShardSet.open(str(shard_dir))
    plan = rank_plan(shards, rank=0, world=1, seed=0, batch_size=100, pool_share=None, window=4)
    b = next(epoch_batches(plan, 1)).to_train_batch()
    with torch.no_grad():
        nat, adv = teacher(b.x), teacher(b.x_teacher_adv)
    assert torch.allclose(b.teacher_logits, nat, atol=2e-2, rtol=2e-3)
    assert torch.allclose(b.teacher_logits_adv, adv, atol=2e-2, rtol=2e-3)
    # the DPGD views really attack the teacher
    assert (adv.argmax(1) == b.y).float().mean() < (nat.argmax(1) == b.y).float().mean()
    assert b.label_weight is None  # every row has its true label


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_stream_disjoint_rows_in_equal_steps(shard_dir, world):
    """3 parts (not a multiple of 2), the last one shorter: every rank the same steps, disjoint
    rows, each pass reading one view; the order changes from epoch to epoch."""
    shards = ShardSet.open(str(shard_dir))
    orders = {}
    for epoch in (0, 1, 2):
        seen, steps = [], []
        for rank in range(world):
            plan = rank_plan(shards, rank=rank, world=world, seed=5, batch_size=16, pool_share=None, window=1)
            batches = list(epoch_batches(plan, epoch))
            steps.append(len(batches))
            assert all(len(b.index) == 16 and set(b.view.tolist()) == {epoch % 2} for b in batches)
            seen.append(torch.cat([b.index for b in batches]))
        every = torch.cat(seen)
        assert len(set(steps)) == 1 and steps[0] == (150 // world) // 16
        assert len(set(every.tolist())) == len(every)  # disjoint across ranks
        orders[epoch] = seen[0].tolist()
    assert orders[0] != orders[2]  # reshuffled per epoch (same view)


def test_steps_per_epoch_cycles_passes_and_windows_bound_memory(shard_dir):
    shards = ShardSet.open(str(shard_dir))
    plan = rank_plan(shards, rank=0, world=1, seed=0, batch_size=32, pool_share=None, window=1, steps_per_epoch=10)
    batches = list(epoch_batches(plan, 0))
    assert len(batches) == 10  # 320 rows: passes 0, 1 and 2 of 150 rows (views 0, 1, 0)
    assert {v for b in batches for v in b.view.tolist()} == {0, 1}
    again = list(epoch_batches(plan, 0))  # an epoch depends on nothing before it: resumable
    assert all(torch.equal(a.index, b.index) for a, b in zip(batches, again))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_faults_name_the_file(shard_dir, tmp_path):
    d = _copy(shard_dir, tmp_path / "trunc")
    part = d / "part-00001.arrow"
    part.write_bytes(part.read_bytes()[:-100])
    with pytest.raises(ShardError, match="part-00001.arrow.*truncated"):
        ShardSet.open(str(d), full=False)

    d = _copy(shard_dir, tmp_path / "flip")
    manifest = json.loads((d / "manifest.json").read_text())
    data = bytearray((d / "part-00002.arrow").read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside the first unit's pixels
    (d / "part-00002.arrow").write_bytes(bytes(data))
    with pytest.raises(ShardError, match="part-00002.arrow \\(record batch 0\\).*digest"):
        verify(str(d))

    d = _copy(shard_dir, tmp_path / "missing")
    (d / "part-00000.arrow").unlink()
    with pytest.raises(ShardError, match="part-00000.arrow: missing part"):
        ShardSet.open(str(d))

    d = _copy(shard_dir, tmp_path / "manifest")
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match="manifest.json: corrupt manifest"):
        read_manifest(str(d))
    manifest["format_version"] = 1
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="format version 1, this dard reads 2"):
        read_manifest(str(d))
    with pytest.raises(ShardError, match="no manifest"):
        read_manifest(str(tmp_path / "nowhere"))


def test_a_part_altered_after_the_check_stops_the_stream_naming_it(shard_dir, tmp_path):
    """Checked at the start, altered before a rank reads it: the unit read is checked again."""
    d = _copy(shard_dir, tmp_path / "late")
    shards = ShardSet.open(str(d))
    data = bytearray((d / "part-00000.arrow").read_bytes())
    data[len(data) // 3] ^= 0xFF
    (d / "part-00000.arrow").write_bytes(bytes(data))
    plan = rank_plan(shards, rank=0, world=1, seed=0, batch_size=16, pool_share=None, window=1)
    with pytest.raises(ShardError, match="part-00000.arrow \\(record batch .\\): its content differs"):
        list(epoch_batches(plan, 0))


def test_wrong_run_is_refused(shard_dir):
    shards = ShardSet.open(str(shard_dir), full=False)
    attack = {"eps": EPS}
    shards.check_compatible(dataset="digits", num_classes=10)
    with pytest.raises(ShardError, match="dataset 'digits' \\(run: 'cifar10'\\).*num_classes 10 \\(run: 100\\)"):
        shards.check_compatible(dataset="cifar10", num_classes=100)
    with pytest.raises(ShardError, match="attack.eps"):
        shards.check_compatible(dataset="digits", num_classes=10, attack={**attack, "eps": 0.1})
    with pytest.raises(ShardError, match="teacher sha256"):
        shards.check_compatible(dataset="digits", num_classes=10, teacher_sha256="0" * 64)


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
    a, b = read_manifest(out)["parts"], read_manifest(str(shard_dir))["parts"]
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
                         capture_output=True, text=True, timeout=HANG_S)
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


def test_pool_rows_carry_the_teachers_labels_never_the_hidden_ones(teacher_path, tmp_path):
    """``data.labeled``: 60 samples keep their labels (stratified), the other 90 are pool rows whose
    label is the teacher's argmax and whose hidden true label is nowhere in the shards; batches mix
    them at ``pool_share``, and hard-label terms skip a pool row under ``pseudo_labels: none``."""
    teacher = load(teacher_path)
    cfg = small_cfg(tmp_path, labeled=60)
    result = precompute(cfg, teacher_path, str(tmp_path / "p"), views=1, rows_per_part=40, use_ray=False)
    m = result.manifest
    assert m["samples"] == {"labeled": 60, "pool": 90} and [p["kind"] for p in m["parts"]] == ["labeled"] * 2 + ["pool"] * 3
    splits = load_splits(cfg.data)
    assert (splits.pool.labels == -1).all() and len(splits.train) == 60
    shards = ShardSet.open(str(tmp_path / "p"))
    cols = view_rows(shards, 0, kinds=("pool",))
    x = _pixels(cols["x"], (1, 8, 8), np.uint8).float() / 255
    with torch.no_grad():
        expected = teacher(x).argmax(1)
    assert torch.equal(torch.from_numpy(cols["label"].to_numpy().astype(np.int64)), expected)
    assert (cols["label_source"].to_numpy() == 1).all()
    plan = rank_plan(shards, rank=0, world=1, seed=0, batch_size=20, pool_share=0.5, window=2)
    assert plan.steps == (60 + 90) // 20
    batch = next(epoch_batches(plan, 0))
    assert (batch.label_source == 1).sum() == 10
    rst = batch.to_train_batch("teacher")
    assert torch.equal(rst.label_weight, torch.ones(20))
    labeled_only = batch.to_train_batch("none")
    assert torch.equal(labeled_only.label_weight, (batch.label_source == 0).float())
    confident = batch.to_train_batch("teacher", threshold=1.01)
    assert torch.equal(confident.label_weight, (batch.label_source == 0).float())


def test_shards_are_hashed_once_where_a_run_starts_and_never_below(shard_dir, tmp_path, monkeypatch):
    """A directory handed to a run is verified in full once (every part read and every unit digest
    computed); the checked ShardSet it becomes is what ranks and sweep trials get, and building a
    rank's run from it reads no part to check it again."""
    import dard.shards.store as store
    from dard.training import open_shards, prepare

    digests = []
    real = store.batch_digest
    monkeypatch.setattr(store, "batch_digest", lambda batch: digests.append(batch.num_rows) or real(batch))
    cfg = small_cfg(tmp_path).updated(loss={"method": "dard"})
    units = sum(len(p["units"]) for p in read_manifest(str(shard_dir))["parts"])
    checked = open_shards(str(shard_dir), cfg)  # the driver: every unit of every part, once
    assert len(digests) == units
    digests.clear()
    for rank in (0, 1):
        prepare(cfg, shards=checked, rank=rank, world_size=2)  # a DDP worker or a trial, given the ShardSet
    assert digests == []
