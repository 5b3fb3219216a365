"""Real images as `compressor bench`'s inputs (`--images DIR`), torch-free (numpy, Pillow, onnxruntime).

A detector's latency depends on what it sees: the NMS in its graph (model.nms.onnx) and the boxes it decodes cost
more on an image full of objects than on noise, so a detector is timed on images like the ones it will run on.
compress's bench uses the validation images; on the edge device, where there is no dataset reader and no torch,
`--images DIR` reads the folder's first images (sorted, at most MAX_IMAGES) resized to the model's input, RGB (or
luminance for a one-channel model), scaled to [0, 1] as compressor's data readers give them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from compressor.errors import UsageError
from compressor.extras import MissingExtra

MAX_IMAGES = 64
SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def sample_shape(model: str | Path, input_shape: Optional[Sequence[int]]) -> tuple[int, int, int]:
    """(C, H, W) of one sample: --input-shape, else the ONNX input's fixed dims."""
    if input_shape is not None:
        shape = tuple(int(d) for d in input_shape)
    else:
        import onnxruntime as ort

        dims = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).get_inputs()[0].shape[1:]
        if not all(isinstance(d, int) and d > 0 for d in dims):
            raise UsageError(f"--images: the ONNX input of {Path(model).name} has dynamic dims {list(dims)}; give "
                             "--input-shape C,H,W for the size the images are resized to.")
        shape = tuple(dims)
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise UsageError(f"--images needs an image model's input (C, H, W) with 1 or 3 channels, not {shape}.")
    return shape  # type: ignore[return-value]


def image_pool(folder: Path, shape: Sequence[int], limit: int = MAX_IMAGES) -> np.ndarray:
    """(N, C, H, W) float32 in [0, 1]: the folder's first `limit` images (sorted by name), resized to H x W."""
    try:
        from PIL import Image
    except ImportError:
        raise MissingExtra("--images reads images with Pillow, which is not installed.",
                           hint="pip install pillow") from None
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"--images {str(folder)!r} is not a folder of images.")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES)[:limit]
    if not files:
        raise UsageError(f"--images {str(folder)!r} holds no {', '.join(SUFFIXES)} files.")
    channels, height, width = (int(d) for d in shape)
    samples = []
    for path in files:
        try:
            with Image.open(path) as image:
                image = image.convert("RGB" if channels == 3 else "L").resize((width, height), Image.BILINEAR)
                array = np.asarray(image, dtype=np.float32) / 255.0
        except OSError as exc:
            raise UsageError(f"--images: {path} is not a readable image ({exc}).") from None
        samples.append(array.transpose(2, 0, 1) if channels == 3 else array[None])
    return np.stack(samples)
