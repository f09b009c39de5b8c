import csv

import pytest

from dard.modelfile import from_file as load
from dard.video import VideoError, make_sample, read_frames, run_video, write_frames


def test_video_on_the_sample_clip(trained_models, tmp_path):
    clip, labels = make_sample(tmp_path / "clip.mp4", n_images=12, frames_per_image=2)
    frames, fps, comment = read_frames(clip)
    assert frames.shape[0] == 24 and comment == "dard-dataset=digits"
    mf = load(trained_models["natural"]["model_path"])
    result = run_video(clip, mf, attack="pgd20", out=tmp_path / "out.mp4", eps=0.2, step_size=0.05,
                       labels_path=labels)
    decoded, _, _ = read_frames(result.video)
    assert decoded.shape[0] == 24  # ffmpeg decodes the same number of frames
    rows = list(csv.DictReader(open(result.csv)))
    assert len(rows) == 24 and {"pred", "pred_attacked", "flipped"} <= set(rows[0])
    # a non-robust model: the attack changes predictions on some frames
    assert any(r["pred"] != r["pred_attacked"] for r in rows) and result.flip_rate > 0
    assert result.natural_accuracy > 0.8 and result.adversarial_accuracy < result.natural_accuracy


def test_video_errors(trained_models, tmp_path):
    mf = load(trained_models["natural"]["model_path"])
    with pytest.raises(VideoError, match="not found"):
        run_video(tmp_path / "missing.mp4", mf, attack="pgd20", out=tmp_path / "o.mp4", eps=0.2, step_size=0.05)
    (tmp_path / "junk.mp4").write_bytes(b"\x00" * 1000)
    with pytest.raises(VideoError, match="not a readable video|no video stream"):
        run_video(tmp_path / "junk.mp4", mf, attack="pgd20", out=tmp_path / "o.mp4", eps=0.2, step_size=0.05)
    import numpy as np

    clip = write_frames(tmp_path / "c10.mp4", np.zeros((2, 32, 32, 3), np.uint8), 4, comment="dard-dataset=cifar10")
    with pytest.raises(VideoError, match="made for 'cifar10'.*trained on 'digits'"):
        run_video(clip, mf, attack="pgd20", out=tmp_path / "o.mp4", eps=0.2, step_size=0.05)
    with pytest.raises(VideoError, match=r"--eps must be in \[0, 1\]"):
        run_video(clip, mf, attack="pgd20", out=tmp_path / "o.mp4", eps=5, step_size=0.05)
    assert not (tmp_path / "o.mp4").exists()


def test_a_huge_frame_is_decoded_at_the_models_size(trained_models, tmp_path, monkeypatch):
    """A 4096x4096 clip: ffmpeg crops and scales while decoding, so the clip never sits in memory
    at its own resolution (it took 9.4 GB before); a clip over MAX_FRAMES is refused by name."""
    import numpy as np

    import dard.video as video

    frames = np.zeros((3, 4096, 4096, 3), np.uint8)
    frames[:, 1024:3072, 1024:3072] = 255  # a white square in the middle: visible after the crop and scale
    clip = write_frames(tmp_path / "huge.mp4", frames, 4)
    small, _, _ = read_frames(clip, side=32)
    assert small.shape == (3, 32, 32, 3) and small[:, 16, 16].min() > 200 and small[:, 1, 1].max() < 40
    mf = load(trained_models["natural"]["model_path"])
    result = run_video(clip, mf, attack="fgsm", out=tmp_path / "o.mp4", eps=0.2, step_size=0.05)
    assert result.frames == 3
    monkeypatch.setattr(video, "MAX_FRAMES", 2)
    with pytest.raises(VideoError, match="longer than 2 frames"):
        read_frames(clip, side=32)
