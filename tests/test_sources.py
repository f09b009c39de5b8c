"""Your own images: folders and tables as sources, the same shards as a preset's from the same
images, bad folders refused by name before anything is written, a changed source named, a pool
that holds a test image refused, and class names that travel with the model."""
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dard.cli import main
from dard.config import Config
from dard.data import SourceError, list_source, load_splits, source_config
from dard.precompute import build_shards
from tests.conftest import write_png_folder


def _tiny(root, classes=("cat", "dog", "emu"), per_class=6, size=8, seed=0):
    """A small folder of grey PNGs, one sub-folder per class."""
    gen = torch.Generator().manual_seed(seed)
    n = per_class * len(classes)
    images = torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=gen)
    labels = torch.arange(n) % len(classes)
    write_png_folder(root, images, labels, names=list(classes))
    return images, labels


@pytest.fixture(scope="module")
def teacher3(tmp_path_factory):
    """An (untrained) 3-class teacher for the 8x8 grey folders: the source checks come first."""
    from dard.models import build, save_model

    path = tmp_path_factory.mktemp("t3") / "t3.pt"
    save_model(path, build("cnn_small", 3, 1), arch="cnn_small", num_classes=3, in_channels=1, dataset="tiny")
    return str(path)


def test_a_digits_folder_gives_the_presets_shards_bit_for_bit(trained_models, digits_png, tmp_path):
    """The same images as a PNG folder (files named by index, a sub-folder per class) and the digits
    preset: the same splits, and shards equal unit for unit for the same seed."""
    teacher = trained_models["teacher"]["model_path"]
    preset = Config.for_dataset("digits", data={"limit_train": 150}, attack={"steps": 2},
                                run={"progress": False, "out_dir": str(tmp_path)})
    attack = preset.to_dict()["attack"]
    folder = source_config("digits-png", data={"source": f"folder:{digits_png}", "limit_train": 150}, attack=attack,
                           run={"progress": False, "out_dir": str(tmp_path)})
    assert folder.data.classes == tuple(str(d) for d in range(10)) and folder.data.shape == (1, 8, 8)
    a, b = load_splits(preset.data), load_splits(folder.data)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.test.labels, b.test.labels)
    one = build_shards(preset, teacher, str(tmp_path / "preset"), views=2, rows_per_part=64).manifest
    two = build_shards(folder, teacher, str(tmp_path / "folder"), views=2, rows_per_part=64).manifest
    units = lambda m: [u["sha256"] for p in m["parts"] for u in p["units"]]  # noqa: E731
    assert units(one) == units(two) and len(units(one)) == 6
    assert two["source_index"] and (tmp_path / "folder" / two["source_index"]).exists()


def test_a_table_of_images_or_of_paths_is_a_source(tmp_path):
    images, labels = _tiny(tmp_path / "f")
    names = ["cat", "dog", "emu"]

    def png(i):
        buffer = io.BytesIO()
        Image.fromarray(images[i, 0].numpy()).save(buffer, format="PNG")
        return buffer.getvalue()

    rows = range(len(labels))
    pq.write_table(pa.table({"img": [png(i) for i in rows], "kind": [names[labels[i]] for i in rows]}),
                   tmp_path / "t.parquet", row_group_size=7)
    with pa.ipc.new_file(str(tmp_path / "t.arrow"), pa.schema([("image", pa.binary()), ("label", pa.int64())])) as w:
        w.write_table(pa.table({"image": [png(i) for i in rows], "label": labels.tolist()}), max_chunksize=5)
    paths = [f"f/{names[labels[i]]}/{i:05d}.png" for i in rows]
    pq.write_table(pa.table({"image": paths, "label": [names[labels[i]] for i in rows]}), tmp_path / "p.parquet")
    for spec, columns in ((f"table:{tmp_path / 't.parquet'}", {"image_column": "img", "label_column": "kind"}),
                          (f"table:{tmp_path / 't.arrow'}", {}), (f"table:{tmp_path / 'p.parquet'}", {})):
        cfg = source_config("tiny", data={"source": spec, "val_fraction": 0.2, "test_fraction": 0.2, **columns})
        expected = ("cat", "dog", "emu") if "t.arrow" not in spec else ("0", "1", "2")
        assert cfg.data.classes == expected and cfg.data.shape == (1, 8, 8)
        splits = load_splits(cfg.data)
        every = torch.cat([splits.train.images, splits.val.images, splits.test.images])
        assert sorted(map(bytes, every.numpy())) == sorted(map(bytes, images.numpy()))  # each image once, intact
    with pytest.raises(SourceError, match="no column 'label'.*data.label_column"):
        list_source(f"table:{tmp_path / 't.parquet'}", image_column="img")


def _bad_folders(tmp_path):
    """(name, folder spec, a piece of the expected message); each folder is bad in one way."""
    cases = []

    def make(name, **kw):
        root = tmp_path / name
        _tiny(root / ("train" if kw.get("split") else ""), **{k: v for k, v in kw.items() if k != "split"})
        return root

    root = make("unreadable")
    (root / "cat" / "00099.png").write_bytes(b"not a png")
    cases.append(("unreadable", root, "cat/00099.png: not a readable image"))
    root = make("empty")
    (root / "fox").mkdir()
    cases.append(("empty class", root, "class folder " + str(root / "fox") + " holds no image"))
    root = make("testonly", split=True)
    _tiny(root / "test", classes=("cat", "dog", "emu", "yak"), per_class=2)
    cases.append(("class only in test", root, str(root / "test" / "yak") + " is not a class of the training set"))
    root = make("sizes")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "dog" / "00050.png")
    cases.append(("mixed sizes", root, "dog/00050.png: is 10x10 while the source's images are 8x8; set data.image_size"))
    root = make("modes")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "emu" / "00051.png")
    cases.append(("mixed modes", root, "emu/00051.png: has 3 channel(s) (RGB) while the source's images have 1"))
    root = make("other")
    (root / "dog" / "notes.txt").write_text("hi")
    cases.append(("not an image", root, "dog/notes.txt is not an image"))
    root = make("loose")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "stray.png")
    cases.append(("loose image", root, "stray.png is not in a class folder"))
    return cases


def test_bad_folders_are_refused_naming_the_file_before_anything_is_written(teacher3, tmp_path, capsys):
    for name, root, expected in _bad_folders(tmp_path):
        out = tmp_path / "out" / name.replace(" ", "-")
        code = main(["precompute", "--source", f"folder:{root}", "--teacher", teacher3, "--out", str(out), "--local",
                     "--no-progress", "--set", "data.val_fraction=0.2", "--set", "data.test_fraction=0.2"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0 and expected in err, (name, err)
        assert not out.exists(), name
    # said what to do, done: resized, the mixed sizes pass; `dard data check` lists every image
    root = tmp_path / "sizes"
    assert main(["data", "check", f"folder:{root}", "--image-size", "8,8", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "19 images in 3 classes" in printed and "cat (6), dog (7), emu (6)" in printed and "no problem" in printed
    (root / "cat" / "00098.png").write_bytes(b"broken")
    assert main(["data", "check", f"folder:{root}", "--image-size", "8,8", "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert "problem: " + str(root / "cat" / "00098.png") in captured.out and "1 of 20 images" in captured.err


def test_a_source_that_changed_is_named_not_used(teacher3, tmp_path, capsys):
    root = tmp_path / "src"
    _tiny(root, per_class=10)
    quick = ["--source", f"folder:{root}", "--steps", "1", "--no-progress", "--set", "data.val_fraction=0.2",
             "--set", "data.test_fraction=0.2"]
    assert main(["precompute", *quick, "--teacher", teacher3, "--out", str(tmp_path / "s"), "--local"]) == 0
    assert main(["distill", *quick, "--shards", str(tmp_path / "s"), "--epochs", "1", "--batch-size", "8",
                 "--out", str(tmp_path / "m.pt"), "--no-tracking"]) == 0
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "dog" / "00077.png")  # one more image
    capsys.readouterr()
    assert main(["distill", *quick, "--shards", str(tmp_path / "s"), "--epochs", "1", "--out",
                 str(tmp_path / "again.pt"), "--no-tracking"]) == 2
    assert "changed since these shards were built" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tmp_path / "m.pt"), "--attacks", "natural", "--no-progress"]) == 2
    assert "changed since this config was pinned" in capsys.readouterr().err
    assert not (tmp_path / "again.pt").exists() and not (tmp_path / "m-eval").exists()


def test_a_pool_holding_a_test_image_is_refused_naming_the_split(trained_models, tmp_path, capsys):
    from dard.data.presets import _digits

    test = load_splits(Config.for_dataset("digits").data).test
    full = _digits(Config.for_dataset("digits").data)
    pool = tmp_path / "pool"
    pool.mkdir()
    for i in range(5):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(pool / f"blank{i}.png")
    Image.fromarray(test.images[7, 0].numpy()).save(pool / "looks-new.png")
    code = main(["precompute", "--teacher", trained_models["teacher"]["model_path"], "--out", str(tmp_path / "s"),
                 "--local", "--no-progress", "--steps", "1", "--pool", f"folder:{pool}"])
    err = capsys.readouterr().err
    assert code == 2 and "looks-new.png is an image of the test split" in err and not (tmp_path / "s").exists()
    assert full.images.shape[0] == 1797


def test_class_names_and_the_input_travel_with_the_model(teacher3, tmp_path, capsys):
    """The model file, the logged MLflow model, the ONNX export and the report all say the classes
    and the input the model takes."""
    import mlflow

    from dard.export import read_metadata
    from dard.tracking import LOGGED_MODEL_TAG

    root = tmp_path / "pets"
    _tiny(root, per_class=12)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    quick = ["--source", f"folder:{root}", "--steps", "1", "--no-progress", "--set", "data.val_fraction=0.2",
             "--set", "data.test_fraction=0.2"]
    assert main(["train-teacher", *quick, "--epochs", "1", "--arch", "cnn_small", "--out", str(tmp_path / "m.pt"),
                 "--tracking-uri", uri]) == 0
    run_id = capsys.readouterr().out.split("MLflow run ")[1].split()[0]
    header = torch.load(tmp_path / "m.pt", weights_only=True)
    assert header["classes"] == ["cat", "dog", "emu"] and header["dataset"] == "pets"
    assert header["input"]["shape"] == [1, 8, 8] and header["input"]["range"] == [0.0, 1.0]
    assert header["input"]["threat_model"]["eps"] == pytest.approx(0.1)  # the rule's, for grey images
    logged = mlflow.MlflowClient(tracking_uri=uri).get_run(run_id).data.tags[LOGGED_MODEL_TAG]
    mlflow.set_tracking_uri(uri)
    info = mlflow.models.get_model_info(f"models:/{logged}")
    assert info.metadata["dard.classes"] == ["cat", "dog", "emu"] and info.metadata["dard.input"]["channels"] == "grey"
    assert main(["export", "--model", str(tmp_path / "m.pt"), "--format", "onnx", "--out", str(tmp_path / "m.onnx"),
                 "--limit", "8", "--aa-limit", "2"]) == 0
    props = read_metadata(tmp_path / "m.onnx", "onnx")
    assert json.loads(props["dard.classes"]) == ["cat", "dog", "emu"]
    assert json.loads(props["dard.input"])["range"] == [0.0, 1.0]
    assert main(["evaluate", "--model", str(tmp_path / "m.pt"), "--attacks", "natural,fgsm", "--no-checks",
                 "--no-progress", "--out-dir", str(tmp_path / "eval")]) == 0
    page = (tmp_path / "eval" / "robustness.html").read_text()
    assert "Classes (output order): cat, dog, emu" in page and "pixels in [0, 1]" in page
