import pickle

import pytest
import torch

from dard.models import ModelFileError, available, build, count_parameters, load_model, load_teacher, save_model


@pytest.mark.parametrize("name,channels,size,low,high", [
    ("cnn_small", 1, 8, 10_000, 20_000), ("cnn_large", 1, 8, 400_000, 700_000),
    ("resnet18", 3, 32, 11_000_000, 11_300_000), ("mobilenetv2", 3, 32, 2_200_000, 2_400_000),
    ("wrn28_10", 3, 32, 36_400_000, 36_600_000), ("wrn34_10", 3, 32, 46_100_000, 46_200_000),
])
def test_output_shape_and_size(name, channels, size, low, high):
    model = build(name, num_classes=10, in_channels=channels).eval()
    with torch.no_grad():
        assert model(torch.rand(2, channels, size, size)).shape == (2, 10)
    assert low <= count_parameters(model) <= high
    assert build(name, num_classes=100, in_channels=channels).eval()(torch.rand(1, channels, size, size)).shape == (1, 100)


def test_width_knob_scales_the_small_cnns_and_travels_in_the_model_file(tmp_path):
    from dard.config import Config, ConfigError
    from dard.modelfile import save_for
    from dard.models import build_for

    sizes = {}
    for width in (0.25, 0.5, 1.0):
        cfg = Config.for_dataset("digits", model={"kwargs": {"width": width}})
        model = build_for(cfg.model, cfg.data)
        sizes[width] = count_parameters(model)
        path = save_for(tmp_path / f"w{width}.pt", model, cfg)
        loaded, header = load_model(path)
        assert count_parameters(loaded) == sizes[width]
        assert header["arch_kwargs"] == ({} if width == 1.0 else {"width": width})  # width-1 files unchanged
    assert 900 < sizes[0.25] < 1_200 and 3_500 < sizes[0.5] < 4_000 and sizes[1.0] == count_parameters(build("cnn_small", 10, 1))
    with pytest.raises(ConfigError, match=r"model.kwargs.width: resnet18 has no such knob; its knobs: none"):
        Config.for_dataset("digits", model={"arch": "resnet18", "kwargs": {"width": 0.5}})
    with pytest.raises(ConfigError, match=r"model.kwargs.width: must be in \(0, 16\]"):
        Config.for_dataset("digits", model={"kwargs": {"width": 0.0}})
    # configs recorded before model.kwargs (model files, YAML) still read, knobs where they apply
    assert Config.for_dataset("digits", model={"width": 0.5, "depth": 34, "widen_factor": 10}).model.kwargs == {"width": 0.5}
    with pytest.raises(ConfigError, match=r"model.kwargs.width: resnet18 has no such knob"):
        Config.for_dataset("digits", model={"arch": "resnet18", "width": 0.5})


def test_registry_lists_all_and_rejects_unknown():
    assert {"cnn_small", "cnn_large", "resnet18", "mobilenetv2", "wideresnet", "wrn34_10", "wrn28_10"} <= set(available())
    with pytest.raises(ValueError, match="unknown architecture"):
        build("vgg99", 10)


def test_wideresnet_has_robustbench_keys():
    """Key names of RobustBench's wide_resnet.py (conv1, blockN.layer.i.{bn1,conv1,bn2,conv2,convShortcut}, bn1, fc)."""
    keys = set(build("wrn28_10", 10).state_dict())
    expected = {"conv1.weight", "block1.layer.0.bn1.weight", "block1.layer.0.bn1.running_mean",
                "block1.layer.0.bn1.num_batches_tracked", "block1.layer.0.conv1.weight", "block1.layer.0.bn2.weight",
                "block1.layer.0.conv2.weight", "block1.layer.0.convShortcut.weight", "block2.layer.0.convShortcut.weight",
                "block3.layer.3.conv2.weight", "bn1.weight", "bn1.running_var", "fc.weight", "fc.bias"}
    assert expected <= keys
    assert "block1.layer.1.convShortcut.weight" not in keys  # only where in/out widths differ
    assert not any(k.startswith("normalize") for k in keys)  # normalisation adds no keys
    assert len([k for k in keys if k.endswith("conv1.weight") and "layer" in k]) == 12  # (28-4)/6 = 4 blocks x 3


def test_robustbench_style_checkpoint_loads(tmp_path):
    """A bare state dict as RobustBench stores TRADES WRN-34-10: 'module.' prefix and sub_block1 keys."""
    src = build("wideresnet", 10, depth=16, widen_factor=1, sub_block1=True).eval()
    state = {"module." + k: v for k, v in src.state_dict().items()}
    path = tmp_path / "rb.pt"
    torch.save({"state_dict": state}, path)
    model, header = load_teacher(path, "wideresnet", 10, 3, depth=16, widen_factor=1)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), src(x))


def test_load_teacher_errors(tmp_path):
    model = build("cnn_small", 10, 1)
    path = save_model(tmp_path / "t.pt", model, arch="cnn_small", num_classes=10, in_channels=1, dataset="digits")
    with pytest.raises(ModelFileError, match="expects arch='resnet18'"):
        load_teacher(path, "resnet18", 10, 1)
    with pytest.raises(ModelFileError, match="num_classes=100"):
        load_teacher(path, "cnn_small", 100, 1)
    with pytest.raises(ModelFileError, match="not found"):
        load_teacher(tmp_path / "nope.pt", "cnn_small", 10, 1)
    torch.save(build("cnn_small", 10, 1).state_dict(), tmp_path / "bare.pt")
    with pytest.raises(ModelFileError, match="classifier has 10 outputs in the file but the run expects 100"):
        load_teacher(tmp_path / "bare.pt", "cnn_small", 100, 1)
    with pytest.raises(ModelFileError, match="missing keys"):
        load_teacher(tmp_path / "bare.pt", "cnn_large", 10, 1)
    (tmp_path / "corrupt.pt").write_bytes(b"not a zip at all")
    with pytest.raises(ModelFileError, match="weights-only"):
        load_teacher(tmp_path / "corrupt.pt", "cnn_small", 10, 1)


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_objects_are_refused(tmp_path, capsys):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    with pytest.raises(ModelFileError) as refused:
        load_teacher(tmp_path / "evil.pt", "cnn_small", 10, 1)
    assert "must never run" not in capsys.readouterr().out
    # the error names what the file holds, without torch's advice to load it with weights_only=False
    assert "not a PyTorch file" in str(refused.value) and "weights_only" not in str(refused.value)  # a bare pickle
    torch.save(build("cnn_small", 10, 1), tmp_path / "whole.pt")  # a whole module, as torch.save(model) writes it
    (tmp_path / "model.json").write_text('{"arch": "cnn_small"}')
    for path, why in (("whole.pt", "it holds a pickled dard.models.small_cnn.SmallCNN"),
                      ("model.json", "not a PyTorch file: Unsupported operand 123")):
        with pytest.raises(ModelFileError) as refused:
            load_teacher(tmp_path / path, "cnn_small", 10, 1)
        assert why in str(refused.value) and "weights_only" not in str(refused.value), refused.value


def test_model_file_round_trip(tmp_path):
    model = build("cnn_small", 10, 1).eval()
    path = save_model(tmp_path / "m.pt", model, arch="cnn_small", num_classes=10, in_channels=1, dataset="digits",
                      meta={"method": "trades"})
    again, header = load_model(path)
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    assert header["meta"]["method"] == "trades" and header["dataset"] == "digits"
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(ModelFileError, match="not a dard model file"):
        load_model(tmp_path / "bare.pt")
