"""ImageNet-layout folders: the Vim eval transform, seeded calibration subsets, errors."""

from __future__ import annotations

import os

import pytest
import torch

from vmfx.data import calibration_loader, calibration_subset, image_folder, load_digits, vim_eval_transform
from vmfx.errors import CalibrationDataError


def write_digit_folder(root: str, per_class: int = 3, split: str = "test", offset: int = 0) -> str:
    """Write real digits from the bundled set as PNGs, one folder per class ("0".."9")."""
    from PIL import Image

    x, y = load_digits(split, normalize=False, border=0)
    counts = {c: 0 for c in range(10)}
    for img, label in zip(x[offset:], y[offset:]):
        c = int(label)
        if counts[c] >= per_class:
            continue
        os.makedirs(os.path.join(root, str(c)), exist_ok=True)
        Image.fromarray((img[0].numpy() * 255).round().astype("uint8"), mode="L").save(
            os.path.join(root, str(c), f"{counts[c]}.png")
        )
        counts[c] += 1
        if all(v >= per_class for v in counts.values()):
            break
    return root


def test_eval_transform_matches_official_recipe(tmp_path):
    from PIL import Image

    t = vim_eval_transform(224)
    img = Image.new("RGB", (320, 280), (255, 0, 0))
    x = t(img)
    assert x.shape == (3, 224, 224)
    # pure red normalized with the ImageNet mean/std
    torch.testing.assert_close(x[:, 100, 100], torch.tensor([(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225]))
    names = [type(s).__name__ for s in t.transforms]
    assert names[1:] == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert t.transforms[1].size == 256 and t.transforms[1].interpolation.value == "bicubic"


def test_folder_of_digits_reads_back_as_the_same_images(tmp_path):
    root = write_digit_folder(str(tmp_path / "val"), per_class=2)
    ds = image_folder(root, transform=vim_eval_transform(28, crop_pct=1.0, channels=1))
    assert len(ds) == 20 and ds.classes == [str(c) for c in range(10)]
    x, label = ds[0]
    assert x.shape == (1, 28, 28) and label == 0


def test_calibration_subset_is_seeded(tmp_path):
    root = write_digit_folder(str(tmp_path / "train"), per_class=3, split="train")
    ds = image_folder(root, transform=vim_eval_transform(28, crop_pct=1.0, channels=1))
    a, b = calibration_subset(ds, 7, seed=3), calibration_subset(ds, 7, seed=3)
    assert a.indices == b.indices and a.indices != calibration_subset(ds, 7, seed=4).indices
    loader = calibration_loader(root, n=10, seed=0, batch_size=4, img_size=28, channels=1)
    assert [batch[0].shape[0] for batch in loader] == [4, 4, 2]


def test_folder_errors(tmp_path):
    with pytest.raises(CalibrationDataError, match="does not exist"):
        image_folder(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationDataError, match="ImageNet-layout"):
        image_folder(str(tmp_path / "empty"))
    root = write_digit_folder(str(tmp_path / "few"), per_class=1)
    ds = image_folder(root, transform=vim_eval_transform(28, crop_pct=1.0, channels=1))
    with pytest.raises(CalibrationDataError, match="holds only 10"):
        calibration_subset(ds, 11)


def write_corrupt_image(root: str, name: str = "broken.png", content: bytes = b"this is not a PNG") -> str:
    """Add a file with an image extension that PIL cannot read to the first class folder."""
    first = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))[0]
    path = os.path.join(root, first, name)
    with open(path, "wb") as f:
        f.write(content)
    return path


def _truncated_png(tmp_path) -> bytes:
    from PIL import Image

    noise = (torch.rand(28, 28, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    Image.fromarray(noise, mode="L").save(tmp_path / "whole.png")  # noise: the pixel data spans many bytes
    whole = (tmp_path / "whole.png").read_bytes()
    return whole[: len(whole) // 2]


@pytest.mark.parametrize("kind", ["not an image", "truncated"])
def test_an_unreadable_image_is_named(tmp_path, kind):
    import vmfx
    from tests.conftest import TinyVimLike

    root = write_digit_folder(str(tmp_path / "train"), per_class=1, split="train")
    content = b"this is not a PNG" if kind == "not an image" else _truncated_png(tmp_path)
    bad = write_corrupt_image(root, content=content)
    ds = image_folder(root, transform=vim_eval_transform(28, crop_pct=1.0, channels=1))
    index = [path for path, _ in ds.samples].index(bad)
    with pytest.raises(CalibrationDataError, match=f"cannot read the image '{bad}'.*remove or replace the file"):
        ds[index]
    loader = calibration_loader(root, n=11, batch_size=4, img_size=28, channels=1)
    with pytest.raises(CalibrationDataError, match="cannot read the image .*broken.png"):
        vmfx.compile(TinyVimLike(channels=1).eval(), loader)


@pytest.mark.parametrize("crop_pct", [0.0, -0.5, 1.5])
def test_crop_pct_outside_0_1_is_refused(crop_pct):
    import vmfx

    with pytest.raises(vmfx.ConfigError, match=r"crop_pct must be in \(0, 1\]"):
        vim_eval_transform(224, crop_pct=crop_pct)
