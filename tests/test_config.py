import pytest

from dard.config import Config, ConfigError, from_dict, load_yaml, save_yaml


def test_paper_defaults():
    cfg = Config()
    assert cfg.attack.eps == pytest.approx(8 / 255) and cfg.attack.step_size == pytest.approx(2 / 255)
    assert cfg.attack.steps == 10
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.batch_size) == (0.1, 0.9, 2e-4, 128)


def test_digits_defaults():
    cfg = Config.for_dataset("digits")
    assert cfg.attack.eps == 0.2 and cfg.model.arch == "cnn_small" and cfg.data.flip is False
    # a one-pixel shift of an 8x8 digit is a 12 % translation: it cost SAT 15 and TRADES 33
    # AutoAttack points (benchmarks/results/augment-digits.md), so digits train without a crop
    assert cfg.data.crop_padding == 0


def test_fashion_mnist_defaults():
    cfg = Config.for_dataset("fashion-mnist")
    assert cfg.data.image_shape == (1, 28, 28) and cfg.data.num_classes == 10
    assert cfg.attack.eps == pytest.approx(0.1) and cfg.data.flip is False


@pytest.mark.parametrize("section,key,value,field", [
    ("attack", "eps", -0.1, "attack.eps"),
    ("attack", "step_size", 0.5, "attack.step_size"),
    ("data", "dataset", "imagenet", "data.dataset"),
    ("model", "arch", "vgg99", "model.arch"),
    ("loss", "method", "magic", "loss.method"),
    ("loss", "temperature", 0.0, "loss.temperature"),
    ("loss", "w_rob", -1.0, "loss.w_rob"),
    ("optim", "epochs", 0, "optim.epochs"),
    ("attack", "dpgd_loss", "mse", "attack.dpgd_loss"),
    ("run", "device", "tpu", "run.device"),
])
def test_validation_names_the_field(section, key, value, field):
    raw = Config.for_dataset("digits").to_dict()
    raw[section][key] = value
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        from_dict(raw)


def test_unknown_key_and_wrong_type_are_errors():
    raw = Config.for_dataset("digits").to_dict()
    raw["optim"]["learning_rate"] = 0.1
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        from_dict(raw)
    raw = Config.for_dataset("digits").to_dict()
    raw["optim"]["epochs"] = "ten"
    with pytest.raises(ConfigError, match="optim.epochs"):
        from_dict(raw)


def test_every_problem_is_named_at_once_and_optional_fields_keep_their_type(tmp_path, capsys):
    from dard.cli import main

    raw = Config.for_dataset("digits").to_dict()
    raw["data"]["data_dir"] = 5  # `str | None`: None or a string, nothing else
    with pytest.raises(ConfigError, match=r"^data\.data_dir: expected a string, got 5$"):
        from_dict(raw)
    raw["optim"]["lr"], raw["loss"]["divergence"] = -0.1, "l2"
    with pytest.raises(ConfigError) as err:
        from_dict(raw)
    message = str(err.value)
    assert "\n" not in message and [p.split(":")[0] for p in message.split("; ")] == [
        "data.data_dir", "loss.divergence", "optim.lr"], message
    # the same from the command line: one line, exit 2, nothing written
    assert main(["distill", "--set", "data.data_dir=5", "--lr", "-0.1", "--set", "loss.divergence=l2",
                 "--out", str(tmp_path / "s.pt")]) == 2
    err_line = capsys.readouterr().err.strip()
    assert err_line.count("\n") == 0 and all(f in err_line for f in ("data.data_dir", "loss.divergence", "optim.lr"))
    assert list(tmp_path.iterdir()) == []


def test_a_config_is_frozen_and_changed_by_copy():
    import dataclasses

    cfg = Config.for_dataset("digits")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # type: ignore[misc]
    changed = cfg.updated(optim={"lr": 0.2})
    assert (cfg.optim.lr, changed.optim.lr) == (0.4, 0.2)
    with pytest.raises(ConfigError, match="optim.lr: must be > 0"):
        cfg.updated(optim={"lr": 0})


def test_yaml_round_trip(tmp_path):
    cfg = Config.for_dataset("digits", loss={"method": "rslad", "temperature": 4.0}, attack={"dpgd_channel_mask": [0]})
    path = save_yaml(cfg, tmp_path / "run.yaml")
    again = load_yaml(path)
    assert again == cfg and again.attack.dpgd_channel_mask == (0,)


def test_yaml_partial_file_takes_dataset_defaults(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("data: {dataset: digits}\nloss: {method: trades}\n")
    cfg = load_yaml(path)
    assert cfg.loss.method == "trades" and cfg.attack.eps == 0.2


def test_bad_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(tmp_path / "bad.yaml")
