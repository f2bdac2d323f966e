"""One image decoder for training, evaluation and serving: files as they come.

`decode_image` turns encoded bytes into float32 RGB 0-255 `(h, w, 3)` with
TensorFlow ops only, so the same function runs in `tf.data` (training and
evaluation) and inside the SavedModel's `image_bytes` signature; the model
sees the same pixels in both. What it handles, and why:

- Transparency (RGBA, grey+alpha, palette PNGs with a tRNS chunk, 32-bit
  BMP): composited over a fixed `background` (default white). The colour a
  file hides under transparent pixels is arbitrary (black in some files,
  white in others); `tf.io.decode_image(channels=3)` would pass it through.
- JPEG EXIF orientation (phone photos): the orientation tag (0x0112) of the
  APP1 Exif segment is parsed with tensor ops on the first 64 KiB (the
  decoders ignore it) and the image is flipped / rotated as a viewer shows
  it (Pillow's `ImageOps.exif_transpose`).
- Greyscale -> RGB; palette -> RGB; 16-bit PNG -> scaled to 0-255 (decoded
  at 16 bits, not truncated); GIF -> first frame (GIF transparency is not
  exposed by TensorFlow's GIF decoder: transparent GIF pixels come out as
  the decoder renders them).
- A file that is not an image, or is truncated, fails in the decoder
  (`InvalidArgumentError`); callers name the file (`data.sources`) or the
  request element (`export.saved_model`).
"""

import tensorflow as tf

WHITE = (255.0, 255.0, 255.0)
_EXIF_SCAN_BYTES = 65536  # APP1 (Exif) comes first in a JPEG; 64 KiB is its maximum size.
_MAX_IFD_ENTRIES = 64
ORIENTATION_TAG = 0x0112


def decode_image(contents, background=WHITE):
    """Encoded JPEG/PNG/GIF/BMP/WebP bytes -> float32 RGB 0-255 `(h, w, 3)`.

    Args:
        contents: scalar string tensor, the encoded file.
        background: 3 floats, 0-255 RGB that transparent pixels are
            composited over. Defaults to white.

    Returns:
        float32 tensor `(height, width, 3)`, height/width after EXIF
        orientation.

    Example:
    ```python
    image = decode_image(tf.io.read_file("photo.jpg"))
    ```
    """
    contents = tf.convert_to_tensor(contents, tf.string)
    background = tf.constant(background, tf.float32, shape=(3,))
    head = tf.strings.substr(contents, 0, 4)
    is_png = tf.equal(head, b"\x89PNG")
    is_jpeg = tf.equal(tf.strings.substr(head, 0, 3), b"\xff\xd8\xff")

    def png():
        # 16 bits always: 8-bit files are scaled by 257, so /257 is exact.
        image = tf.io.decode_png(contents, channels=0, dtype=tf.uint16)
        return _composite(tf.cast(image, tf.float32) / 257.0, background)

    def jpeg():
        image = tf.cast(tf.io.decode_jpeg(contents, channels=3), tf.float32)
        return apply_orientation(image, exif_orientation(contents))

    def other():  # GIF (first frame), BMP, WebP.
        image = tf.io.decode_image(contents, channels=0, expand_animations=False)
        return _composite(tf.cast(image, tf.float32), background)

    image = tf.cond(is_png, png, lambda: tf.cond(is_jpeg, jpeg, other))
    return tf.ensure_shape(image, [None, None, 3])


def _composite(image, background):
    """1-4 channel float 0-255 image -> RGB over `background`."""
    channels = tf.shape(image)[-1]
    rgb = tf.cond(channels <= 2, lambda: tf.tile(image[..., :1], [1, 1, 3]), lambda: image[..., :3])
    has_alpha = tf.logical_or(tf.equal(channels, 2), tf.equal(channels, 4))
    alpha = tf.cond(has_alpha, lambda: image[..., -1:] / 255.0, lambda: tf.ones_like(image[..., :1]))
    return rgb * alpha + background * (1.0 - alpha)


def exif_orientation(contents):
    """The EXIF orientation (1-8) of JPEG bytes; 1 when absent or unreadable.

    Pure tensor ops (works in a SavedModel): finds `FF E1 <len> "Exif\\0\\0"`,
    reads the TIFF header's byte order and IFD0 offset, and looks up tag
    0x0112 among IFD0's entries.
    """
    data = tf.io.decode_raw(tf.strings.substr(contents, 0, _EXIF_SCAN_BYTES), tf.uint8)
    data = tf.cast(data, tf.int32)
    n = tf.shape(data)[0]
    signature = [0xFF, 0xE1, None, None, 0x45, 0x78, 0x69, 0x66, 0x00, 0x00]  # .. "Exif\0\0"
    usable = tf.maximum(n - len(signature), 0)
    match = tf.ones([usable], tf.bool)
    for offset, byte in enumerate(signature):
        if byte is not None:
            match = tf.logical_and(match, tf.equal(data[offset:offset + usable], byte))
    found = tf.where(match)

    def at(i):  # Byte i, or 0 past the end (a truncated header reads as "no tag").
        return tf.where(i < n, tf.gather(data, tf.clip_by_value(i, 0, n - 1)), 0)

    def parse():
        tiff = tf.cast(found[0, 0], tf.int32) + len(signature)
        little = tf.logical_and(tf.equal(at(tiff), 0x49), tf.equal(at(tiff + 1), 0x49))

        def u16(i):
            return tf.where(little, at(i) + 256 * at(i + 1), 256 * at(i) + at(i + 1))

        def u32(i):
            return tf.where(little, u16(i) + 65536 * u16(i + 2), 65536 * u16(i) + u16(i + 2))

        ifd = tiff + u32(tiff + 4)
        count = tf.minimum(u16(ifd), _MAX_IFD_ENTRIES)
        entries = ifd + 2 + 12 * tf.range(_MAX_IFD_ENTRIES)
        tags = u16(entries)
        hit = tf.logical_and(tf.equal(tags, ORIENTATION_TAG), tf.range(_MAX_IFD_ENTRIES) < count)
        value = tf.reduce_max(tf.where(hit, u16(entries + 8), 0))
        return tf.where(tf.logical_and(value >= 1, value <= 8), value, 1)

    return tf.cond(tf.size(found) > 0, parse, lambda: tf.constant(1, tf.int32))


def apply_orientation(image, orientation):
    """Flip/rotate `(h, w, c)` as EXIF `orientation` (1-8) says a viewer shows it."""
    transpose = lambda x: tf.transpose(x, [1, 0, 2])  # noqa: E731
    branches = [
        lambda: image,                                   # 1: as stored
        lambda: tf.reverse(image, [1]),                  # 2: mirrored left-right
        lambda: tf.reverse(image, [0, 1]),               # 3: rotated 180
        lambda: tf.reverse(image, [0]),                  # 4: mirrored top-bottom
        lambda: transpose(image),                        # 5: transposed
        lambda: tf.reverse(transpose(image), [1]),       # 6: rotate 90 clockwise to view
        lambda: tf.reverse(transpose(image), [0, 1]),    # 7: transverse
        lambda: tf.reverse(transpose(image), [0]),       # 8: rotate 90 counter-clockwise to view
    ]
    return tf.switch_case(tf.clip_by_value(orientation - 1, 0, 7), branches)
