"""The images the benchmark serves: the sample photos plus 12-megapixel camera-like JPEGs.

The 12-megapixel JPEGs are the samples cropped to 4:3, upscaled to 4000x3000 and
given sensor-like noise, so they compress like real photos (about 4 MB each at
quality 90) instead of like smooth upscales (a few hundred KB), and so decoding
them costs what decoding a phone photo costs. They are made once and kept.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageChops

from localdev.procs import ROOT

SAMPLES = ROOT / "samples"
PHOTO_SIZE = (4000, 3000)
# Gaussian noise of this sigma (out of 255) per channel, like a phone photo at high ISO;
# 10 at quality 90 gives files of about 3.9 MB, what a 12-megapixel phone camera writes.
NOISE_SIGMA = 10
PHOTO_QUALITY = 90
# Bump when the recipe changes, so stale photos are made again.
_RECIPE = {"version": 1, "size": PHOTO_SIZE, "sigma": NOISE_SIGMA, "quality": PHOTO_QUALITY}
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass(frozen=True)
class Corpus:
    directory: Path
    samples: tuple[str, ...]  # file names of the sample photos
    photos: tuple[str, ...]  # file names of the 12-megapixel JPEGs

    @property
    def mixed(self) -> tuple[str, ...]:
        return self.samples + self.photos

    def urls(self, base: str, names: tuple[str, ...], count: int) -> list[str]:
        """``count`` URLs cycling over ``names``; the query makes each URL distinct."""
        return [f"{base}/{names[i % len(names)]}?i={i}" for i in range(count)]

    def photo_paths(self) -> list[Path]:
        return [self.directory / name for name in self.photos]


def build(directory: Path) -> Corpus:
    """The corpus in ``directory``: samples copied, one 12-MP photo made from each sample."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = directory / "recipe.json"
    fresh = not stamp.exists() or stamp.read_text() != json.dumps(_RECIPE)
    samples, photos = [], []
    for source in sorted(SAMPLES.iterdir()):
        if source.suffix.lower() not in _IMAGE_SUFFIXES:
            continue
        shutil.copyfile(source, directory / source.name)
        samples.append(source.name)
        photo = directory / f"photo-{source.stem}.jpg"
        if fresh or not photo.exists():
            _make_photo(source, photo)
        photos.append(photo.name)
    stamp.write_text(json.dumps(_RECIPE))
    return Corpus(directory, tuple(samples), tuple(photos))


def _make_photo(source: Path, target: Path) -> None:
    with Image.open(source) as opened:
        picture = opened.convert("RGB")
    width, height = picture.size
    # Crop to 4:3 first, so the upscale keeps the picture's proportions.
    crop_w = min(width, height * 4 // 3)
    crop_h = crop_w * 3 // 4
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    picture = picture.crop((left, top, left + crop_w, top + crop_h))
    picture = picture.resize(PHOTO_SIZE, Image.Resampling.BICUBIC)
    # effect_noise is centred on 128; offset -128 turns it into noise around zero.
    noise = Image.merge("RGB", [Image.effect_noise(PHOTO_SIZE, NOISE_SIGMA) for _ in range(3)])
    noisy = ImageChops.add(picture, noise, scale=1.0, offset=-128)
    partial = target.with_suffix(".part")
    noisy.save(partial, format="JPEG", quality=PHOTO_QUALITY)
    partial.replace(target)
