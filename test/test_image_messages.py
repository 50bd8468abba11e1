"""Image message <-> numpy conversions: every encoding, row padding, byte order, compressed input, bad input, and
duck typing (rclpy messages, rosbags messages, plain objects). Agrees with rosbags-image's decoder."""

from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from ecmnet_core.image_messages import (
    SUPPORTED_ENCODINGS,
    ImageConversionError,
    array_to_compressed,
    array_to_image,
    check_image,
    compressed_dimensions,
    compressed_to_bgr8,
    image_to_array,
    image_to_bgr8,
    message_to_bgr8,
)

RNG = np.random.default_rng(0)
BGR = RNG.integers(0, 256, (6, 10, 3), dtype=np.uint8)


def plain(array: np.ndarray, encoding: str, step: int | None = None, bigendian: bool = False) -> SimpleNamespace:
    """A plain object with the Image fields, rows padded to ``step`` bytes."""
    h, w = array.shape[:2]
    rows = array.astype(array.dtype.newbyteorder(">" if bigendian else "<")).reshape(h, -1).view(np.uint8)
    step = step or rows.shape[1]
    data = np.zeros((h, step), np.uint8)
    data[:, : rows.shape[1]] = rows
    return SimpleNamespace(height=h, width=w, encoding=encoding, is_bigendian=int(bigendian), step=step,
                           data=data.tobytes())


@pytest.mark.parametrize("encoding,source,expected", [
    ("bgr8", BGR, BGR),
    ("rgb8", BGR[..., ::-1], BGR),
    ("bgra8", np.dstack([BGR, BGR[..., :1]]), BGR),
    ("rgba8", np.dstack([BGR[..., ::-1], BGR[..., :1]]), BGR),
    ("8UC3", BGR, BGR),
    ("mono8", BGR[..., 0], BGR[..., 0]),
    ("8UC1", BGR[..., 0], BGR[..., 0]),
    ("mono16", BGR[..., 0].astype(np.uint16) * 257, BGR[..., 0]),
    ("16UC1", BGR[..., 0].astype(np.uint16) * 257, BGR[..., 0]),
    ("bgr16", BGR.astype(np.uint16) * 257, BGR),
    ("rgb16", BGR[..., ::-1].astype(np.uint16) * 257, BGR),
])
@pytest.mark.parametrize("padding", [0, 7])
@pytest.mark.parametrize("bigendian", [False, True])
def test_raw_encodings_decode_to_bgr(encoding, source, expected, padding, bigendian):
    row = source.shape[1] * (source.shape[2] if source.ndim == 3 else 1) * source.itemsize
    msg = plain(np.ascontiguousarray(source), encoding, step=row + padding, bigendian=bigendian)
    out = image_to_bgr8(msg)
    assert out.dtype == np.uint8 and out.shape == expected.shape
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(image_to_array(msg), source)  # passthrough keeps depth and channel order


@pytest.mark.parametrize("encoding", ["bayer_rggb8", "bayer_bggr16", "uyvy", "yuyv", "yuv422", "nv12", "nv21"])
def test_camera_encodings_match_rosbags_image(encoding):
    """Same pixels as rosbags-image. For nv12/nv21 our ``height`` is the picture's (sensor_msgs, cv_bridge), where
    rosbags-image takes it as the rows of both planes: the same bytes, two headers."""
    rosbags_image = pytest.importorskip("rosbags.image")
    h, w = 6, 10
    if encoding.startswith("bayer"):
        src = RNG.integers(0, 65536 if encoding.endswith("16") else 256, (h, w),
                           dtype=np.uint16 if encoding.endswith("16") else np.uint8)
    elif encoding.startswith("nv"):
        src = RNG.integers(0, 256, (h * 3 // 2, w), dtype=np.uint8)  # Y plane + interleaved chroma plane
    else:
        src = RNG.integers(0, 256, (h, w, 2), dtype=np.uint8)
    msg = plain(src, encoding)
    theirs = rosbags_image.message_to_cvimage(msg, "bgr8")
    if encoding.startswith("nv"):
        msg.height = h
    ours = image_to_bgr8(msg)
    assert ours.shape == theirs.shape == (h, w, 3)
    np.testing.assert_array_equal(ours, theirs)


def _valid_size(encoding: str, h: int, w: int) -> bool:
    if encoding in ("nv12", "nv21"):
        return h % 2 == 0 and w % 2 == 0
    if encoding in ("uyvy", "yuv422", "yuyv", "yuv422_yuy2"):
        return w % 2 == 0
    return True


def raw_message(encoding: str, h: int, w: int, padding: int = 0, seed: int = 0) -> SimpleNamespace:
    """A random, well-formed message of ``encoding`` for an h x w picture (``step`` padded by ``padding``)."""
    from ecmnet_core.image_messages import encoding_info

    info = encoding_info(encoding)
    row = w * info.channels * np.dtype(info.dtype).itemsize
    rows = h * 3 // 2 if encoding in ("nv12", "nv21") else h
    data = np.random.default_rng(seed).integers(0, 256, rows * (row + padding), dtype=np.uint8)
    return SimpleNamespace(height=h, width=w, encoding=encoding, is_bigendian=0, step=row + padding,
                           data=data.tobytes())


ODD_AND_EVEN_SIZES = [(1, 1), (2, 1), (1, 2), (3, 2), (2, 3), (5, 7), (6, 4), (75, 336), (357, 480), (360, 478),
                      (528, 204)]


@pytest.mark.parametrize("encoding", SUPPORTED_ENCODINGS)
def test_every_encoding_decodes_at_the_image_size_or_is_rejected_as_a_bad_size(encoding):
    """For every accepted encoding and odd/even sizes, padded or not: a decoded picture has exactly the message's
    height x width; sizes that a subsampled format cannot have (odd 4:2:2 widths, odd 4:2:0 sizes) raise a
    ``size`` error, never an OpenCV error or a picture of another size."""
    for h, w in ODD_AND_EVEN_SIZES:
        for padding in (0, 3):
            msg = raw_message(encoding, h, w, padding)
            if _valid_size(encoding, h, w):
                assert image_to_bgr8(msg).shape[:2] == (h, w), (encoding, h, w, padding)
            else:
                with pytest.raises(ImageConversionError) as err:
                    image_to_bgr8(msg)
                assert err.value.kind == "size" and encoding in str(err.value)


def test_nv12_length_follows_the_picture_height():
    """nv12 with ``height`` counting both planes (the rosbags-image reading) does not fit ``step * height * 3/2``:
    rejected, not guessed."""
    msg = raw_message("nv12", 6, 10)
    msg.height = 9  # data is 10 x 9 bytes, the header now claims a 10 x 9 picture with 13.5 rows
    with pytest.raises(ImageConversionError):
        image_to_bgr8(msg)
    msg = raw_message("nv12", 6, 10)
    msg.data = msg.data[:-10]
    with pytest.raises(ImageConversionError, match=r"step x height x 3/2") as err:
        image_to_bgr8(msg)
    assert err.value.kind == "length"


def test_step_below_a_row_and_nul_padded_encoding_are_rejected():
    """A step smaller than one row is malformed (a larger one is padding and fine); an encoding string with a
    trailing NUL is not a known encoding (rclpy messages never carry one: the C layer ends strings at NUL)."""
    msg = raw_message("bgr8", 4, 5)
    msg.step, msg.data = 14, msg.data[: 14 * 4]
    with pytest.raises(ImageConversionError, match="smaller than one row") as err:
        image_to_bgr8(msg)
    assert err.value.kind == "length"
    msg = raw_message("mono8", 4, 5)
    msg.encoding = "mono8\0"
    with pytest.raises(ImageConversionError) as err:
        image_to_bgr8(msg)
    assert err.value.kind == "encoding"


def test_every_supported_encoding_is_listed_and_16bit_scaling_matches_rosbags():
    rosbags_image = pytest.importorskip("rosbags.image")
    assert {"rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16", "16UC1"} <= set(SUPPORTED_ENCODINGS)
    depth = RNG.integers(0, 65536, (5, 7), dtype=np.uint16)
    msg = plain(depth, "mono16")
    np.testing.assert_array_equal(image_to_bgr8(msg), rosbags_image.message_to_cvimage(msg, "mono8"))


def test_rclpy_and_rosbags_messages_are_accepted():
    pytest.importorskip("sensor_msgs")
    typesys = pytest.importorskip("rosbags.typesys")
    msg = array_to_image(BGR, "bgr8")  # rclpy message, data is an array.array
    assert msg.step == 30 and msg.encoding == "bgr8" and not msg.is_bigendian
    np.testing.assert_array_equal(image_to_bgr8(msg), BGR)

    store = typesys.get_typestore(typesys.Stores.ROS2_KILTED)
    header = store.types["std_msgs/msg/Header"](stamp=store.types["builtin_interfaces/msg/Time"](sec=3, nanosec=4),
                                                frame_id="cam")
    bag_msg = array_to_image(BGR[..., ::-1], "rgb8", header, msg_type=store.types["sensor_msgs/msg/Image"])
    assert isinstance(bag_msg.data, np.ndarray) and bag_msg.header.frame_id == "cam"
    np.testing.assert_array_equal(image_to_bgr8(bag_msg), BGR)
    raw = store.serialize_cdr(bag_msg, "sensor_msgs/msg/Image")  # a valid message, as written to a bag
    np.testing.assert_array_equal(image_to_bgr8(store.deserialize_cdr(raw, "sensor_msgs/msg/Image")), BGR)


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_compressed_round_trip_and_header_sniffing(fmt):
    image = cv2.resize(BGR, (96, 64), interpolation=cv2.INTER_NEAREST)
    msg = array_to_compressed(image, fmt, msg_type=lambda **kw: SimpleNamespace(**kw))
    assert msg.format == fmt and compressed_dimensions(msg.data.tobytes()) == (64, 96)
    out = compressed_to_bgr8(msg)
    assert out.shape == (64, 96, 3)
    if fmt == "png":
        np.testing.assert_array_equal(out, image)
    else:
        assert np.abs(out.astype(int) - image.astype(int)).mean() < 12
    mono = array_to_compressed(image[..., 0], "png", msg_type=lambda **kw: SimpleNamespace(**kw))
    np.testing.assert_array_equal(message_to_bgr8(mono), image[..., 0])


@pytest.mark.parametrize("mutate,kind", [
    (dict(encoding="weird9"), "encoding"),
    (dict(width=0), "size"),
    (dict(height=0, data=b""), "size"),
    (dict(data=bytes(29)), "length"),
    (dict(step=20), "length"),
    (dict(step=31), "length"),
])
def test_bad_raw_messages_raise_with_a_kind(mutate, kind):
    msg = plain(BGR, "bgr8")
    for key, value in mutate.items():
        setattr(msg, key, value)
    with pytest.raises(ImageConversionError) as err:
        image_to_bgr8(msg)
    assert err.value.kind == kind
    assert str(err.value)  # a readable reason


def test_giant_images_are_refused_before_decoding():
    msg = plain(BGR, "bgr8")
    with pytest.raises(ImageConversionError, match="max_image_pixels") as err:
        check_image(msg, max_pixels=59)
    assert err.value.kind == "too_large"
    check_image(msg, max_pixels=60)
    big = np.zeros((400, 300, 3), np.uint8)
    for fmt in ("jpeg", "png"):
        comp = array_to_compressed(big, fmt, msg_type=lambda **kw: SimpleNamespace(**kw))
        with pytest.raises(ImageConversionError) as err:
            compressed_to_bgr8(comp, max_pixels=100_000)
        assert err.value.kind == "too_large"


def test_corrupt_and_empty_compressed_images():
    good = array_to_compressed(BGR, "jpeg", msg_type=lambda **kw: SimpleNamespace(**kw))
    corrupt = SimpleNamespace(format="jpeg", data=b"\xff\xd8\xff\xe0" + bytes(40))
    with pytest.raises(ImageConversionError) as err:
        compressed_to_bgr8(corrupt)
    assert err.value.kind == "decode"
    truncated = SimpleNamespace(format="jpeg", data=good.data.tobytes()[:20])
    with pytest.raises(ImageConversionError):
        compressed_to_bgr8(truncated)
    with pytest.raises(ImageConversionError) as err:
        compressed_to_bgr8(SimpleNamespace(format="png", data=b""))
    assert err.value.kind == "size"


def test_array_to_image_checks_encoding_against_the_array():
    with pytest.raises(ValueError, match="needs 3 channel"):
        array_to_image(BGR[..., 0], "bgr8", msg_type=lambda **kw: SimpleNamespace(**kw))
    with pytest.raises(ValueError, match="shape"):
        array_to_image(np.zeros((0, 4), np.uint8), msg_type=lambda **kw: SimpleNamespace(**kw))
    msg = array_to_image(BGR[..., 0].astype(np.uint16), msg_type=lambda **kw: SimpleNamespace(**kw))
    assert msg.encoding == "mono16" and msg.step == 20


def test_compressed_garbage_is_rejected_on_arrival_as_undecodable():
    """No image header at all: refused by the cheap check (so the node counts it as bad on arrival instead of
    slotting it and counting it as a stale drop when the next frame replaces it)."""
    from ecmnet_core.image_messages import check_compressed

    garbage = SimpleNamespace(format="jpeg", data=bytes(range(7, 107)))
    with pytest.raises(ImageConversionError) as err:
        check_compressed(garbage)
    assert err.value.kind == "decode" and "not an image stream" in str(err.value)
    for good in (array_to_compressed(BGR, "jpeg"), array_to_compressed(BGR, "png")):
        assert check_compressed(good) == BGR.shape[:2]


def test_library_messages_go_into_the_error_not_onto_stderr(capfd):
    """libpng prints its own line to stderr for every broken frame (no throttle reaches it): the decoder captures it
    into the error the node throttles, and leaves other stderr output alone."""
    import os
    from types import SimpleNamespace

    import cv2

    from ecmnet_core.image_messages import ImageConversionError, check_compressed, compressed_to_bgr8, decode_quietly

    ok, png = cv2.imencode(".png", np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    damaged = bytearray(png.tobytes())
    damaged[200:260] = bytes(b ^ 0x55 for b in damaged[200:260])  # inside the image data: a CRC error
    with pytest.raises(ImageConversionError, match=r"corrupt or unsupported codec \(libpng error: IDAT: CRC error\)"):
        compressed_to_bgr8(SimpleNamespace(format="png", data=bytes(damaged)))
    # cut short: found on arrival from the missing IEND chunk, before any decoder runs
    with pytest.raises(ImageConversionError, match="cut short: no IEND chunk"):
        check_compressed(SimpleNamespace(format="png", data=png[: len(png) // 2].tobytes()))
    image, said = decode_quietly(png)
    assert image is not None and image.shape == (64, 96, 3) and said == ""
    os.write(2, b"a line of our own\n")
    err = capfd.readouterr().err
    assert "libpng" not in err and "a line of our own" in err
