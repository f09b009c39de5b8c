import csv

import pytest

from dard.models import load_model
from dard.video import VideoError, make_sample, read_frames, run_video, write_frames


def test_video_on_the_sample_clip(trained_models, tmp_path):
    clip, labels = make_sample(tmp_path / "clip.mp4", n_images=12, frames_per_image=2)
    frames, fps, comment = read_frames(clip)
    assert frames.shape[0] == 24 and comment == "dard-dataset=digits"
    model, header = load_model(trained_models["natural"]["model_path"])
    result = run_video(clip, model, header, attack="pgd20", out=tmp_path / "out.mp4", eps=0.2, step_size=0.05,
                       labels_path=labels)
    decoded, _, _ = read_frames(result.video)
    assert decoded.shape[0] == 24  # ffmpeg decodes the same number of frames
    rows = list(csv.DictReader(open(result.csv)))
    assert len(rows) == 24 and {"pred", "pred_attacked", "flipped"} <= set(rows[0])
    # a non-robust model: the attack changes predictions on some frames
    assert any(r["pred"] != r["pred_attacked"] for r in rows) and result.flip_rate > 0
    assert result.natural_accuracy > 0.8 and result.adversarial_accuracy < result.natural_accuracy


def test_video_errors(trained_models, tmp_path):
    model, header = load_model(trained_models["natural"]["model_path"])
    with pytest.raises(VideoError, match="not found"):
        run_video(tmp_path / "missing.mp4", model, header, attack="pgd20", out=tmp_path / "o.mp4", eps=0.2, step_size=0.05)
    (tmp_path / "junk.mp4").write_bytes(b"\x00" * 1000)
    with pytest.raises(VideoError, match="not a readable video|no video stream"):
        run_video(tmp_path / "junk.mp4", model, header, attack="pgd20", out=tmp_path / "o.mp4", eps=0.2, step_size=0.05)
    import numpy as np

    clip = write_frames(tmp_path / "c10.mp4", np.zeros((2, 32, 32, 3), np.uint8), 4, comment="dard-dataset=cifar10")
    with pytest.raises(VideoError, match="made for 'cifar10'.*trained on 'digits'"):
        run_video(clip, model, header, attack="pgd20", out=tmp_path / "o.mp4", eps=0.2, step_size=0.05)
