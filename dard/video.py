"""`dard video`: classify every frame of a clip natural and under attack; annotated MP4 + CSV.

Frames are decoded with ffmpeg-python, using the static ffmpeg binary that imageio-ffmpeg ships
unless one is on PATH, so no system package is needed. ffmpeg centre-crops each frame to a square
and scales it to 4x the model's input while decoding (memory follows the model, not the clip;
at most ``MAX_FRAMES`` frames), then it is resized to the model's input (area averaging; grey for
1-channel models), classified, attacked
(PGD-20 or DPGD-20 at the model's eps), classified again, and drawn side by side: natural |
adversarial, each with prediction and confidence, and whether the attack flipped it.
"""
from __future__ import annotations

import contextlib
import csv
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dard.attacks.registry import ATTACKS, AttackParams
from dard.config import Config
from dard.data import load_splits
from dard.seeding import generator

SAMPLE_TAG = "dard-dataset="


class VideoError(ValueError):
    """A missing or unreadable clip, a clip without video, or a clip made for another dataset."""


def ffmpeg_binary() -> str:
    found = shutil.which("ffmpeg")
    if found:
        return found
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _probe(path: Path) -> dict:
    """Stream info via `ffmpeg -i` (ffprobe is not shipped by imageio-ffmpeg)."""
    import re
    import subprocess

    out = subprocess.run([ffmpeg_binary(), "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr
    match = re.search(r"Stream #\S+.*?Video: .*?(\d{2,5})x(\d{2,5})", out)
    if not match:
        if "Invalid data" in out or "could not find codec" in out.lower() or "moov atom not found" in out:
            raise VideoError(f"{path}: not a readable video file ({out.strip().splitlines()[-1]})")
        raise VideoError(f"{path}: has no video stream")
    fps = re.search(r"(\d+(?:\.\d+)?) fps", out)
    comment = re.search(r"comment\s*:\s*(.*)", out)
    return {"width": int(match.group(1)), "height": int(match.group(2)), "fps": float(fps.group(1)) if fps else 25.0,
            "comment": comment.group(1).strip() if comment else ""}

MAX_FRAMES = 10_000  # a clip is held in memory at the decode size: bounded, and said so


def read_frames(path: str | Path, side: int | None = None) -> tuple[np.ndarray, float, str]:
    """(frames uint8 (N, H, W, 3), fps, comment metadata). ``side``: ffmpeg crops each frame to
    its centre square and area-scales it to ``side`` x ``side`` while decoding, so memory follows
    ``side``, not the clip's resolution (a 4096x4096 clip decodes like any other). At most
    ``MAX_FRAMES`` frames; a longer clip is refused with one line."""
    import ffmpeg

    path = Path(path)
    if not path.is_file():
        raise VideoError(f"video not found: {path}")
    info = _probe(path)
    stream = ffmpeg.input(str(path))
    height = width = side
    if side is not None:
        stream = stream.filter("crop", "min(iw,ih)", "min(iw,ih)").filter("scale", side, side, flags="area")
    else:
        height, width = info["height"], info["width"]
    with ffmpeg_reason(path):
        raw, _ = (stream.output("pipe:", format="rawvideo", pix_fmt="rgb24", vframes=MAX_FRAMES + 1)
                  .run(cmd=ffmpeg_binary(), capture_stdout=True, capture_stderr=True))
    frames = np.frombuffer(raw, np.uint8).reshape(-1, height, width, 3)
    if len(frames) == 0:
        raise VideoError(f"{path}: the video stream has no frames")
    if len(frames) > MAX_FRAMES:
        raise VideoError(f"{path}: longer than {MAX_FRAMES} frames; cut it first (ffmpeg -i IN -frames:v "
                         f"{MAX_FRAMES} OUT)")
    return frames, info["fps"], info["comment"]


def write_frames(path: str | Path, frames: np.ndarray, fps: float, comment: str = "") -> Path:
    """frames: uint8 (N, H, W, 3), H and W even. H.264, yuv420p, near-lossless (crf 12)."""
    import ffmpeg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n, h, w, _ = frames.shape
    kwargs = {"vcodec": "libx264", "pix_fmt": "yuv420p", "crf": 12, "r": fps}
    if comment:
        kwargs["metadata"] = f"comment={comment}"
    with ffmpeg_reason(path):
        (ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{w}x{h}", r=fps)
         .output(str(path), **kwargs).overwrite_output()
         .run(cmd=ffmpeg_binary(), input=np.ascontiguousarray(frames).tobytes(), capture_stdout=True, capture_stderr=True))
    return path


@contextlib.contextmanager
def ffmpeg_reason(path: Path):
    """ffmpeg's failure as one :class:`VideoError` carrying ffmpeg's own reason (its last line)."""
    import ffmpeg

    try:
        yield
    except ffmpeg.Error as err:
        said = [line.strip() for line in (err.stderr or b"").decode(errors="replace").splitlines() if line.strip()]
        raise VideoError(f"{path}: ffmpeg failed: {said[-1] if said else 'no reason given'}") from None


def frames_to_inputs(frames: np.ndarray, channels: int, size: int | tuple[int, int]) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, channels, h, w) in [0, 1] (``size``: (h, w), or one side of a
    square): centre square crop, area resize."""
    x = torch.from_numpy(frames.copy()).permute(0, 3, 1, 2).float() / 255
    h, w = x.shape[2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = x[:, :, top:top + side, left:left + side]
    x = F.interpolate(x, size=(size, size) if isinstance(size, int) else tuple(size), mode="area")
    if channels == 1:
        x = x.mean(1, keepdim=True)
    return x.clamp(0, 1)


def make_sample(path: str | Path, n_images: int = 24, frames_per_image: int = 2, size: int = 64, fps: float = 8,
                seed: int = 0) -> tuple[Path, Path]:
    """A small clip of digits test images (each held ``frames_per_image`` frames) and its labels CSV."""

    test = load_splits(Config.for_dataset("digits").data).test
    idx = torch.randperm(len(test), generator=generator(seed))[:n_images]
    images = test.images[idx].float()  # (n, 1, 8, 8) uint8 values
    big = F.interpolate(images, size=(size, size), mode="nearest").round().clamp(0, 255).to(torch.uint8)
    frames = big.repeat_interleave(frames_per_image, 0).repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy()
    labels = test.labels[idx].repeat_interleave(frames_per_image).tolist()
    path = write_frames(path, frames, fps, comment=f"{SAMPLE_TAG}digits")
    labels_path = Path(path).with_suffix(".labels.csv")
    with open(labels_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["frame", "label"])
        w.writerows(enumerate(labels))
    return path, labels_path


def read_labels(path: str | Path, n_frames: int, num_classes: int) -> torch.Tensor:
    """A CSV with a ``label`` column (and ``frame``), one row per frame -> labels (n_frames,) int64."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if "label" not in (reader.fieldnames or []):
            raise VideoError(f"{path}: no 'label' column (header: {reader.fieldnames}); expected frame,label")
        rows = list(reader)
    if len(rows) != n_frames:
        raise VideoError(f"{path}: {len(rows)} labels for {n_frames} frames")
    try:
        labels = torch.tensor([int(r["label"]) for r in rows])
    except (TypeError, ValueError) as err:
        raise VideoError(f"{path}: labels must be integers ({err})") from err
    if labels.min() < 0 or labels.max() >= num_classes:
        raise VideoError(f"{path}: labels outside [0, {num_classes}) for this model")
    return labels


@dataclass
class VideoResult:
    frames: int
    flip_rate: float
    natural_accuracy: float | None
    adversarial_accuracy: float | None
    video: Path
    csv: Path
    eps: float  # the attack's radius (the model's training eps unless given)


def annotate(natural: np.ndarray, adversarial: np.ndarray, texts: tuple[str, str], flipped: bool,
             panel: int = 256) -> np.ndarray:
    """Two panels side by side with a caption strip under each; uint8 (panel + 40, 2 * panel, 3)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (2 * panel, panel + 40), "white")
    for i, (img, text) in enumerate(zip((natural, adversarial), texts)):
        tile = Image.fromarray(img).resize((panel, panel), Image.NEAREST)
        canvas.paste(tile, (i * panel, 0))
        draw = ImageDraw.Draw(canvas)
        color = (200, 0, 0) if (i == 1 and flipped) else (0, 0, 0)
        draw.text((i * panel + 6, panel + 4), text, fill=color)
    draw.text((6, panel + 22), "natural", fill=(90, 90, 90))
    draw.text((panel + 6, panel + 22), "attacked" + ("  FLIPPED" if flipped else ""), fill=(90, 90, 90))
    return np.asarray(canvas)


def run_video(input_path: str | Path, model_file, *, attack: str, out: str | Path, eps: float | None = None,
              step_size: float | None = None, labels_path: str | Path | None = None, batch_size: int = 64,
              seed: int = 0) -> VideoResult:
    """Classify a clip natural and attacked; write the annotated MP4 and the per-frame CSV.
    ``model_file``: a :class:`dard.modelfile.ModelFile`; its input (channels, size) and, unless
    given, the eps and step it was trained for say how frames become inputs and how hard to attack."""

    if attack not in ATTACKS:
        raise VideoError(f"--attack must be one of {', '.join(ATTACKS)}, got {attack!r}")
    threat = model_file.input.get("threat_model") or {}
    eps = threat.get("eps") if eps is None else eps
    step_size = threat.get("step_size") if step_size is None else step_size
    if eps is None or step_size is None:
        raise VideoError(f"{model_file.where}: records no training eps; pass --eps and --step-size")
    if not (0 <= eps <= 1 and step_size > 0):
        raise VideoError(f"--eps must be in [0, 1] and --step-size > 0 (pixels in [0, 1]), got {eps} and {step_size}")
    model, header, dataset = model_file.model, model_file.header, model_file.dataset
    shape = model_file.input.get("shape")
    if shape is None:
        raise VideoError(f"{model_file.where}: records no input shape (a model saved outside a training run)")
    channels, size = shape[0], (shape[1], shape[2])
    # decoded already cropped and scaled to 4x the model's input: the last area step is frames_to_inputs'
    frames, fps, comment = read_frames(input_path, side=4 * max(size))
    if comment.startswith(SAMPLE_TAG) and dataset and comment[len(SAMPLE_TAG):] != dataset:
        raise VideoError(f"{input_path}: a sample clip made for {comment[len(SAMPLE_TAG):]!r}, but the model was "
                         f"trained on {dataset!r}; make a sample for the model's dataset")
    x = frames_to_inputs(frames, channels, size)
    device = next(model.parameters()).device
    model.eval()
    labels = read_labels(labels_path, len(x), header["num_classes"]) if labels_path else None
    nat_p, adv_p, x_adv_all = [], [], []
    params = AttackParams(eps, step_size, seed)
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device)
        with torch.no_grad():
            p = torch.softmax(model(xb), 1)
        target = labels[i:i + batch_size].to(device) if labels is not None else p.argmax(1)
        xa = ATTACKS[attack](model, xb, target, params)
        with torch.no_grad():
            pa = torch.softmax(model(xa), 1)
        nat_p.append(p.cpu())
        adv_p.append(pa.cpu())
        x_adv_all.append(xa.cpu())
    nat_p, adv_p, x_adv = torch.cat(nat_p), torch.cat(adv_p), torch.cat(x_adv_all)
    pred, pred_adv = nat_p.argmax(1), adv_p.argmax(1)
    flipped = pred != pred_adv

    def to_rgb(t: torch.Tensor) -> np.ndarray:
        img = (t.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        return np.repeat(img, 3, 2) if img.shape[2] == 1 else img

    panels = [annotate(to_rgb(x[i]), to_rgb(x_adv[i]),
                       (f"pred {int(pred[i])} ({100 * float(nat_p[i].max()):.0f}%)",
                        f"pred {int(pred_adv[i])} ({100 * float(adv_p[i].max()):.0f}%)"), bool(flipped[i]))
              for i in range(len(x))]
    out = Path(out)
    write_frames(out, np.stack(panels), fps)
    csv_path = out.with_suffix(".csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["frame", "label", "pred", "confidence", "pred_attacked", "confidence_attacked", "flipped"])
        for i in range(len(x)):
            w.writerow([i, "" if labels is None else int(labels[i]), int(pred[i]), f"{float(nat_p[i].max()):.4f}",
                        int(pred_adv[i]), f"{float(adv_p[i].max()):.4f}", int(flipped[i])])
    nat_acc = adv_acc = None
    if labels is not None:
        nat_acc = (pred == labels).float().mean().item()
        adv_acc = (pred_adv == labels).float().mean().item()
    result = VideoResult(len(x), flipped.float().mean().item(), nat_acc, adv_acc, out, csv_path, eps)
    out.with_suffix(".json").write_text(json.dumps({**result.__dict__, "video": str(out), "csv": str(csv_path),
                                                    "attack": attack, "eps": eps}, indent=2))
    return result
