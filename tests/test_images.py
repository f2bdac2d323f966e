"""Images as they come: one decoder for training, evaluation and serving.

Each fixture is made with Pillow; the expected pixels are computed from the
pixel values written (or, for EXIF, from Pillow's own `exif_transpose`), and
the SavedModel's `image_bytes` signature must give the same pixels as the
training data path for the very same bytes.
"""

import io
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from tftransfer.data import images, sources
from tftransfer.errors import UserError
from tftransfer.export import saved_model
from tftransfer.heads import HeadSpec

S = 8  # Every fixture is S x S, so one exported model serves them all.
RED = (200, 30, 10)


def _encode(image, fmt="PNG", **kw):
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _rgba(hidden):
    """Left half opaque red, right half transparent over `hidden`, one pixel half alpha."""
    a = np.zeros((S, S, 4), "uint8")
    a[:, : S // 2] = RED + (255,)
    a[:, S // 2:] = hidden + (0,)
    a[0, 0] = (0, 0, 255, 128)
    return a


def _expected_rgba(background=(255.0, 255.0, 255.0)):
    a = _rgba((0, 0, 0)).astype("float32")
    alpha = a[..., 3:] / 255.0
    return a[..., :3] * alpha + np.array(background, "float32") * (1 - alpha)


def _palette_with_transparency():
    p = Image.new("P", (S, S), 0)
    p.putpalette([0, 0, 0] + list(RED) + [0] * 762)
    for y in range(S):
        for x in range(S // 2):
            p.putpixel((x, y), 1)
    data = _encode(p, "PNG", transparency=0)  # index 0 (black) is transparent
    expected = np.full((S, S, 3), 255.0, "float32")
    expected[:, : S // 2] = RED
    return data, expected


def _grey():
    g = (np.arange(S * S).reshape(S, S) * 4).astype("uint8")
    return _encode(Image.fromarray(g, "L")), np.repeat(g[..., None].astype("float32"), 3, -1)


def _sixteen_bit():
    g = (np.arange(S * S).reshape(S, S) * 1000 + 7).astype("uint16")
    return _encode(Image.fromarray(g)), np.repeat((g / 257.0)[..., None].astype("float32"), 3, -1)


def _quadrants():
    a = np.zeros((S, S, 3), "uint8")
    a[: S // 2, : S // 2] = (250, 0, 0)
    a[: S // 2, S // 2:] = (0, 250, 0)
    a[S // 2:, : S // 2] = (0, 0, 250)
    a[S // 2:, S // 2:] = (250, 250, 250)
    return Image.fromarray(a)


def _exif_jpeg(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(_quadrants(), "JPEG", quality=95, exif=exif.tobytes())
    # Pillow's own orientation mapping applied to the stored pixels as
    # TensorFlow's libjpeg decodes them (Pillow's libjpeg build upsamples
    # chroma differently, by up to ~12 levels at colour edges).
    stored = Image.fromarray(tf.io.decode_jpeg(data).numpy())
    stored.getexif()[0x0112] = orientation
    viewed = np.asarray(ImageOps.exif_transpose(stored), "float32")
    pillow = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"), "float32")
    assert np.abs(viewed - pillow).mean() < 6  # the same picture, whichever decoder (8x8: all edges)
    return data, viewed


def _animated_gif():
    frames = [Image.new("RGB", (S, S), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    return data, np.full((S, S, 3), (255.0, 0.0, 0.0), "float32")


CASES = {
    "rgba_black_hidden": lambda: (_encode(Image.fromarray(_rgba((0, 0, 0)), "RGBA")), _expected_rgba()),
    "rgba_white_hidden": lambda: (_encode(Image.fromarray(_rgba((255, 255, 255)), "RGBA")), _expected_rgba()),
    "palette_transparency": _palette_with_transparency,
    "palette_opaque": lambda: (_encode(_quadrants().convert("P")),
                               np.asarray(_quadrants().convert("P").convert("RGB"), "float32")),
    "greyscale": _grey,
    "sixteen_bit": _sixteen_bit,
    "exif_rotate_90_cw": lambda: _exif_jpeg(6),
    "exif_rotate_180": lambda: _exif_jpeg(3),
    "exif_rotate_90_ccw": lambda: _exif_jpeg(8),
    "exif_mirrored": lambda: _exif_jpeg(2),
    "exif_transverse": lambda: _exif_jpeg(7),
    "animated_gif_first_frame": _animated_gif,
}


@pytest.fixture(scope="module")
def pixel_server(tmp_path_factory):
    """A SavedModel whose regression head returns the decoded pixels themselves."""
    converter = keras.layers.Rescaling(1.0)
    converter.image_size = (S, S)  # no resize: the exported model sees the decoded pixels
    inputs = keras.Input((S, S, 3))
    model = keras.Model(inputs, {"pixels": keras.layers.Flatten()(inputs)})
    heads = [HeadSpec(name="pixels", type="regression", num_classes=S * S * 3)]
    path = saved_model.export_saved_model(model, converter, "image", heads,
                                          str(tmp_path_factory.mktemp("export") / "pixels"))
    serve = tf.saved_model.load(path).signatures["serving_default"]
    return lambda data: serve(image_bytes=tf.constant([data]))["values"].numpy().reshape(S, S, 3)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Every case's bytes, expected pixels and what `load_image_folder` (the
    training / evaluation path) yields for the file: one class folder per case."""
    root = tmp_path_factory.mktemp("folder")
    made = {}
    for name, make in CASES.items():
        data, expected = make()
        ext = {b"\x89PNG": ".png", b"GIF8": ".gif"}.get(data[:4], ".jpg")
        (root / name).mkdir()
        (root / name / ("img" + ext)).write_bytes(data)
        made[name] = (data, expected)
    loaded = sources.load_image_folder(str(root))
    assert loaded.class_names == sorted(CASES)
    trained = {loaded.class_names[y]: x for x, y in loaded.train.dataset.as_numpy_iterator()}
    return {name: (data, expected, trained[name]) for name, (data, expected) in made.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_decoded_pixels_are_expected_and_serving_matches_training(case, cases, pixel_server):
    data, expected, trained = cases[case]
    assert trained.shape == expected.shape
    assert np.abs(trained - expected).max() <= 1e-3, case
    served = pixel_server(data)
    np.testing.assert_allclose(served, trained, atol=1e-4)  # the same function, bit for bit


def test_hidden_colour_no_longer_reaches_the_model():
    black = images.decode_image(_encode(Image.fromarray(_rgba((0, 0, 0)), "RGBA"))).numpy()
    white = images.decode_image(_encode(Image.fromarray(_rgba((255, 255, 255)), "RGBA"))).numpy()
    np.testing.assert_array_equal(black, white)
    grey = images.decode_image(_encode(Image.fromarray(_rgba((0, 0, 0)), "RGBA")), background=(128, 128, 128))
    np.testing.assert_allclose(grey.numpy(), _expected_rgba((128, 128, 128)), atol=1e-3)
    # The old decoder showed the model whatever the file hid.
    old = tf.io.decode_image(_encode(Image.fromarray(_rgba((255, 255, 255)), "RGBA")), channels=3).numpy()
    assert old[0, -1].tolist() == [255, 255, 255] and black[0, -1].tolist() == [255, 255, 255]
    old_black = tf.io.decode_image(_encode(Image.fromarray(_rgba((0, 0, 0)), "RGBA")), channels=3).numpy()
    assert old_black[0, -1].tolist() == [0, 0, 0]


def test_truncated_file_is_named_or_skipped_and_counted(tmp_path, pixel_server):
    good, _ = _grey()
    bad = _encode(Image.fromarray(_rgba((0, 0, 0)), "RGBA"))[:60]
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    (folder / "good.png").write_bytes(good)
    (folder / "broken.png").write_bytes(bad)
    with pytest.raises(UserError, match=r"broken\.png.*skip_bad_images"):
        sources.load_image_folder(str(tmp_path / "train"))
    loaded = sources.load_image_folder(str(tmp_path / "train"), skip_bad_images=True)
    assert loaded.train.num_examples == 1 and [os.path.basename(p) for p in loaded.skipped] == ["broken.png"]
    with pytest.raises(tf.errors.InvalidArgumentError):
        pixel_server(bad)


def test_exif_orientation_is_read_in_graph_for_both_byte_orders():
    in_graph = tf.function(images.exif_orientation, input_signature=[tf.TensorSpec([], tf.string)])
    for orientation in range(1, 9):
        data, _ = _exif_jpeg(orientation)
        assert int(in_graph(tf.constant(data))) == orientation
    # Big-endian ("MM") TIFF header, written by hand: orientation 6.
    tiff = b"MM\x00\x2a\x00\x00\x00\x08" + b"\x00\x01" + b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00" + b"\x00" * 4
    app1 = b"\xff\xe1" + (len(tiff) + 8).to_bytes(2, "big") + b"Exif\x00\x00" + tiff
    jpeg = _encode(_quadrants(), "JPEG")
    assert int(images.exif_orientation(jpeg[:2] + app1 + jpeg[2:])) == 6
    assert int(images.exif_orientation(_encode(_quadrants(), "JPEG"))) == 1  # no EXIF
