"""One storage rule for every output, checked before any work: every command's output option
refuses what it could not write -- a scheme pyarrow cannot write, a URI missing a slash (never a
local `s3:` folder), a folder where a file goes and a file where a folder goes, a path under a
file, a URI where only a local path can be -- with one line naming the option, exit 2, nothing
written; and no output over an input."""
import pytest

from dard.cli import main

FILE, FOLDER = "file", "folder"
# command argv before the option, the option, what it takes, whether a URI is refused (local only)
OUTPUTS = [
    (["train-teacher", "--epochs", "1"], "--out", FILE, False),
    (["train-teacher", "--epochs", "1"], "--run-dir", FOLDER, True),
    (["distill", "--epochs", "1"], "--out", FILE, False),
    (["distill", "--epochs", "1"], "--run-dir", FOLDER, True),
    (["evaluate", "--model", "m.pt"], "--out-dir", FOLDER, False),
    (["export", "--model", "m.pt", "--format", "onnx"], "--out", FILE, False),
    (["video", "--input", "clip.mp4", "--model", "m.pt"], "--out", FILE, True),
    (["registry", "load", "x@champion", "--tracking-uri", "sqlite:///m.db"], "--out", FILE, False),
    (["train", "--shards", "s"], "--out", FILE, False),
    (["train", "--shards", "s"], "--storage-path", FOLDER, False),
    (["train", "--shards", "s"], "--run-dir", FOLDER, True),
    (["precompute", "--teacher", "t.pt"], "--out", FOLDER, False),
    (["sweep", "--shards", "s"], "--storage-path", FOLDER, False),
    (["sweep", "--shards", "s"], "--run-dir", FOLDER, True),
    (["demo"], "--out", FOLDER, True),
]
ID = [f"{' '.join(a[:2] if a[0] == 'registry' else a[:1])} {o}" for a, o, _, _ in OUTPUTS]


@pytest.mark.parametrize("argv,option,kind,local_only", OUTPUTS, ids=ID)
def test_every_output_option_is_checked_before_any_work(argv, option, kind, local_only, tmp_path, monkeypatch,
                                                        capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "a-file").write_text("x")
    suffix = ".onnx" if argv[0] == "export" else ".mp4" if argv[0] == "video" else ""
    cases = [("ftp://host/x" + suffix, "must be a local path" if local_only else "not a storage URI dard can write"),
             ("s3:/bucket/x" + suffix, "a slash missing"),
             ("a-file/x" + suffix, "cannot be made")]
    cases.append(("a-folder", "is a folder; name a file") if kind == FILE else ("a-file", "is a file; name a folder"))
    if suffix:
        cases.append(("out.txt", f"must end in {suffix}"))
    for dest, said in cases:
        assert main([*argv, option, dest]) == 2, (option, dest)
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"{option} " in err and said in err, (dest, err)
    # nothing written: no output, and no local folder named like a URI scheme, anywhere
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a-folder"]
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(":")]


@pytest.mark.parametrize("argv", [
    ["export", "--model", "m.onnx", "--format", "onnx", "--out", "m.onnx"],
    ["video", "--input", "clip.mp4", "--model", "m.pt", "--out", "clip.mp4"],
    ["distill", "--shards", "s", "--out", "s"],
    ["evaluate", "--model", "m.pt", "--out-dir", "m.pt"],
], ids=["export", "video", "distill", "evaluate"])
def test_no_output_over_an_input(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name in ("m.onnx", "clip.mp4", "m.pt"):
        (tmp_path / name).write_bytes(b"input")
    (tmp_path / "s").mkdir()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "is an input of this command" in err or "is a folder" in err or "is a file" in err, err
    assert all((tmp_path / name).read_bytes() == b"input" for name in ("m.onnx", "clip.mp4", "m.pt"))
