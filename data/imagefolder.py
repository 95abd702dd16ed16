"""Images from a folder tree: one subfolder per class (torchvision's ImageFolder layout) or a flat folder.

Each image is read with PIL, converted to RGB or grayscale, resized so that its shorter side is `resolution`
(Lanczos, as EDM's dataset tool) and centre-cropped to a square. Images are read lazily, one per item.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .images import check_resolution, uint8_to_float

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
MODES = {1: "L", 3: "RGB"}


def _image_files(folder, recursive):
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(file for file in candidates
                  if file.is_file() and file.suffix.lower() in EXTENSIONS
                  and not any(part.startswith(".") for part in file.relative_to(folder).parts))


def load_square(file, resolution, mode):
    """Read one image as uint8 [C, resolution, resolution]: shorter side resized, then centre-cropped."""
    try:
        with Image.open(file) as image:
            image = image.convert(mode)
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read image {file}: {error}") from None
    scale = resolution / min(image.size)
    width, height = (max(resolution, round(side * scale)) for side in image.size)
    image = image.resize((width, height), Image.LANCZOS)
    left, top = (width - resolution) // 2, (height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
    return pixels.unsqueeze(0) if pixels.dim() == 2 else pixels.permute(2, 0, 1).contiguous()


class ImageFolder(Dataset):
    """Images from a folder (a subfolder per class, or flat = unconditional), resized and centre-cropped."""

    def __init__(self, path=None, resolution=32, channels=3):
        check_resolution(resolution)
        if isinstance(channels, bool) or not isinstance(channels, int) or channels not in MODES:
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
        if path is None:
            raise FileNotFoundError("ImageFolder needs path=<folder of images, one subfolder per class>")
        root = Path(path).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root} (expected a folder of images, "
                                    f"one subfolder per class)")
        subfolders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        top_files = _image_files(root, recursive=False)
        if subfolders and top_files:
            raise ValueError(f"{root} mixes images ({top_files[0].name}, ...) with subfolders ({subfolders[0].name}, "
                             f"...): use one subfolder per class, or a flat folder of images for unlabelled data")
        if subfolders:
            self.classes = [d.name for d in subfolders]
            per_class = [_image_files(d, recursive=True) for d in subfolders]
            empty = [d.name for d, files in zip(subfolders, per_class) if not files]
            if empty:
                raise ValueError(f"class folder(s) {', '.join(empty)} in {root} hold no images "
                                 f"(extensions {', '.join(EXTENSIONS)})")
            self.files = [file for files in per_class for file in files]
            labels = [label for label, files in enumerate(per_class) for _ in files]
        else:
            if not top_files:
                raise FileNotFoundError(f"no images in {root} (looked for {', '.join(EXTENSIONS)})")
            self.classes, self.files, labels = [], top_files, [0] * len(top_files)
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.num_classes = len(self.classes)
        self.resolution, self.mode = resolution, MODES[channels]
        self.shape = (channels, resolution, resolution)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        return uint8_to_float(load_square(self.files[index], self.resolution, self.mode)), self.labels[index]
