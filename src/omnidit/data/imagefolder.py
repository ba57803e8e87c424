"""A folder of captioned images: the way to bring your own data.

Images (png/jpg/jpeg/webp/bmp, any case) are found recursively and sorted by relative path. The
caption of ``a/b.png`` is ``a/b.txt`` when it exists, else the ``text`` of the line in
``<root>/metadata.jsonl`` whose ``file_name`` is ``a/b.png`` (the Hugging Face imagefolder format),
else "". Files that cannot be read are skipped with a single warning; the dataset never crashes on a
bad image.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from omnidit.errors import OmniditError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA = "metadata.jsonl"


def _read_metadata(root: Path) -> dict[str, str]:
    """{relative posix path: caption} from ``root/metadata.jsonl`` (empty if there is none)."""
    path = root / METADATA
    if not path.is_file():
        return {}
    captions = {}
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name, text = row["file_name"], row.get("text", row.get("caption", ""))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise OmniditError(
                f"{path}:{n} is not a valid metadata line ({type(e).__name__}: {e})",
                hint='each line must be a JSON object like {"file_name": "a/b.png", "text": "a caption"}',
            ) from None
        captions[Path(name).as_posix()] = str(text)
    return captions


def _verify(path: Path) -> str | None:
    """None if PIL can parse ``path``'s header and structure, else the reason it cannot."""
    try:
        with Image.open(path) as img:
            img.verify()  # cheap: checks structure without decoding pixels
    except Exception as e:  # PIL raises many types for bad files; any of them means "skip"
        return f"{type(e).__name__}: {e}"
    return None


def _flatten(img: Image.Image, mode: str) -> Image.Image:
    """Convert to ``mode`` ("RGB" or "L"), compositing any transparency onto white."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert(mode)


class ImageFolderDataset(Dataset):
    """``ds[i]`` -> {"image": (C, H, W) in [-1, 1], "caption": str, "label": -1}.

    Each image is scaled (bicubic) so its shorter side fits, then centre-cropped to (height, width).
    """

    num_classes = 0

    def __init__(self, root: str | Path, width: int, height: int, channels: int = 3) -> None:
        if channels not in (1, 3):
            raise OmniditError(f"channels must be 1 or 3, got {channels}")
        if int(width) < 1 or int(height) < 1:
            raise OmniditError(f"image size must be positive, got {width}x{height}")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise OmniditError(f"image folder {str(root)!r} does not exist or is not a directory",
                               hint="pass data.path=/path/to/folder holding your images")
        self.width, self.height, self.channels = int(width), int(height), channels
        candidates = sorted(
            (p for p in self.root.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file()),
            key=lambda p: p.relative_to(self.root).as_posix(),
        )
        if not candidates:
            raise OmniditError(f"no images found in {str(root)!r}",
                               hint=f"put {'/'.join(e[1:] for e in EXTENSIONS)} files in it (subfolders ok)")
        self.files: list[Path] = []
        skipped: list[tuple[Path, str]] = []
        for p in candidates:
            reason = _verify(p)
            if reason is None:
                self.files.append(p)
            else:
                skipped.append((p, reason))
        if skipped:
            first, reason = skipped[0]
            warnings.warn(
                f"skipped {len(skipped)} of {len(candidates)} images that could not be read "
                f"(first: {first}: {reason})",
                stacklevel=2,
            )
        if not self.files:
            raise OmniditError(f"none of the {len(candidates)} images in {str(root)!r} could be read",
                               hint="check the files are valid images")
        metadata = _read_metadata(self.root)
        self.captions = [self._caption(p, metadata) for p in self.files]
        self.num_samples = len(self.files)
        self._bad: set[int] = set()  # files that passed verify() but failed to decode later

    def _caption(self, path: Path, metadata: dict[str, str]) -> str:
        txt = path.with_suffix(".txt")
        if txt.is_file():  # a caption beside the image wins over metadata.jsonl
            return txt.read_text(encoding="utf-8", errors="replace").strip()
        return metadata.get(path.relative_to(self.root).as_posix(), "").strip()

    def __len__(self) -> int:
        return self.num_samples

    def load(self, index: int) -> torch.Tensor:
        """Decode, resize and crop image ``index`` -> (C, H, W) float32 in [-1, 1]; may raise."""
        with Image.open(self.files[index]) as img:
            img = ImageOps.exif_transpose(img)  # photos from phones are often stored rotated
            img = _flatten(img, "RGB" if self.channels == 3 else "L")
            img = ImageOps.fit(img, (self.width, self.height), method=Image.Resampling.BICUBIC)
            arr = np.asarray(img, dtype=np.uint8).reshape(self.height, self.width, self.channels)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)

    def __getitem__(self, index: int) -> dict:
        n = self.num_samples
        if not -n <= index < n:
            raise IndexError(f"image folder index {index} out of range for {n} samples")
        index %= n
        # A file that fails to decode is replaced by the next good one, so a run never dies on it.
        for k in range(n):
            i = (index + k) % n
            if i in self._bad:
                continue
            try:
                image = self.load(i)
            except Exception as e:  # any decode failure: skip the file, as at construction
                if not self._bad:
                    warnings.warn(f"could not decode {self.files[i]} ({type(e).__name__}: {e}); "
                                  "using the next readable image instead (further failures are silent)",
                                  stacklevel=2)
                self._bad.add(i)
                continue
            return {"image": image, "caption": self.captions[i], "label": -1}
        raise OmniditError(f"none of the images in {str(self.root)!r} could be decoded",
                           hint="check the files are valid images")
