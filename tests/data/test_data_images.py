from __future__ import annotations

import io

import numpy as np
import pytest
from data_fixtures import jpeg_bytes, write_image
from PIL import Image

from pefttune.data.datasets import check_images, load_image, to_rgb
from pefttune.data.records import ImageCaptionRecord, ImageLoadError, SkipReport


def saved(tmp_path, image: Image.Image, name: str, **options) -> str:
    path = tmp_path / name
    image.save(path, **options)
    return str(path)


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def test_grayscale_becomes_rgb(tmp_path):
    path = saved(tmp_path, Image.new("L", (6, 6), 90), "grey.png")
    assert (pixels(load_image(path)) == 90).all()


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    image.putpixel((0, 0), 1)
    path = saved(tmp_path, image, "palette.png", transparency=0)
    array = pixels(load_image(path))
    assert tuple(array[0, 0]) == (200, 10, 10)
    assert tuple(array[3, 3]) == (255, 255, 255)  # transparent index 0 is white, not its black palette entry


def test_plain_palette_image(tmp_path):
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 10, 120, 240] + [0] * 762)
    array = pixels(load_image(saved(tmp_path, image, "p.png")))
    assert (array == np.array([10, 120, 240], dtype=np.uint8)).all()


def test_rgba_composited_on_white(tmp_path):
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    image.putpixel((0, 0), (0, 0, 255, 255))
    image.putpixel((1, 0), (0, 0, 0, 128))
    array = pixels(load_image(saved(tmp_path, image, "rgba.png")))
    assert tuple(array[0, 0]) == (0, 0, 255)
    assert tuple(array[3, 3]) == (255, 255, 255)
    assert 120 <= array[0, 1, 0] <= 135  # half-transparent black over white is mid grey


def test_la_composited_on_white(tmp_path):
    image = Image.new("LA", (4, 4), (0, 0))
    image.putpixel((0, 0), (40, 255))
    array = pixels(load_image(saved(tmp_path, image, "la.png")))
    assert tuple(array[0, 0]) == (40, 40, 40) and tuple(array[2, 2]) == (255, 255, 255)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = saved(tmp_path, Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "cmyk.jpg")
    assert Image.open(path).mode == "CMYK"
    red = pixels(load_image(path)).mean(axis=(0, 1))
    assert red[0] > 200 and red[1] < 60 and red[2] < 60


def test_16_bit_grey_is_scaled_not_saturated(tmp_path):
    ramp = np.linspace(0, 65535, 64, dtype=np.float64).round().astype(np.uint16).reshape(8, 8)
    path = saved(tmp_path, Image.fromarray(ramp), "deep.png")
    assert Image.open(path).mode.startswith("I")
    array = pixels(load_image(path))
    assert array.min() == 0 and array.max() == 255
    assert 120 <= array.mean() <= 135  # a linear ramp averages mid grey; clipping would give ~255
    assert np.all(np.diff(array[..., 0].ravel().astype(int)) >= 0)  # order preserved


def test_dark_16_bit_image_keeps_its_values(tmp_path):
    path = saved(tmp_path, Image.fromarray(np.full((4, 4), 257 * 40, dtype=np.uint16)), "dark16.png")
    assert (pixels(load_image(path)) == 40).all()


def test_32_bit_and_float_modes():
    int_image = Image.fromarray(np.array([[0, 70000], [35000, 140000]], dtype=np.int32))
    assert int_image.mode == "I"
    array = pixels(to_rgb(int_image))[..., 0]
    assert array[0, 0] == 0 and array[1, 1] == 255 and 0 < array[1, 0] < 255
    float_image = Image.fromarray(np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32))
    assert pixels(to_rgb(float_image))[..., 0].tolist() == [[0, 128], [255, 64]]


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (8, 4), (0, 200, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = saved(tmp_path, image, "rotated.jpg", exif=exif)
    assert load_image(path).size == (4, 8)


def test_bytes_and_callable_sources():
    assert load_image(jpeg_bytes()).size == (8, 8)
    assert load_image(lambda: Image.new("L", (3, 3), 7)).getpixel((0, 0)) == (7, 7, 7)
    with pytest.raises(ImageLoadError, match="returned str, expected a PIL image"):
        load_image(lambda: "not an image")  # type: ignore[arg-type, return-value]


def test_missing_file_names_file_and_record(tmp_path):
    with pytest.raises(ImageLoadError, match=r"image file not found: .*gone\.jpg \(ann\.json, images\[3\]"):
        load_image(str(tmp_path / "gone.jpg"), record="ann.json, images[3] (image id 'x')")


def test_empty_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"image file is empty \(0 bytes\): .*empty\.jpg \(record 7\)"):
        load_image(str(tmp_path / "empty.jpg"), record="record 7")
    with pytest.raises(ImageLoadError, match="image bytes are empty"):
        load_image(b"")


def test_truncated_jpeg(tmp_path):
    buffer = io.BytesIO()
    noisy = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(buffer, "JPEG", quality=95)
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match=r"cannot load image .*cut\.jpg: OSError: .*truncated.*\(rec\)"):
        load_image(str(path), record="rec")


def test_corrupt_file(tmp_path):
    path = tmp_path / "junk.jpg"
    path.write_bytes(b"\xff\xd8 definitely not a jpeg" * 10)
    with pytest.raises(
        ImageLoadError, match=r"cannot load image .*junk\.jpg: UnidentifiedImageError.*\(rec\)"
    ):
        load_image(str(path), record="rec")


def test_check_images_raise_and_skip(tmp_path):
    good = write_image(tmp_path / "good.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    records = [
        ImageCaptionRecord("g", str(good), ["x"], "train", origin="f, row 1"),
        ImageCaptionRecord("b", str(tmp_path / "bad.jpg"), ["y"], "train", origin="f, row 2"),
    ]
    with pytest.raises(ImageLoadError, match=r"bad\.jpg.*f, row 2 \(image id 'b'\)"):
        check_images(records)
    report = SkipReport()
    kept = check_images(records, on_error="skip", report=report)
    assert [r.image_id for r in kept] == ["g"]
    assert report.counts == {"unreadable_image": 1}
