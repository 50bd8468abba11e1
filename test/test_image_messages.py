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
    rosbags_image = pytest.importorskip("rosbags.image")
    h, w = (9, 10) if encoding.startswith("nv") else (6, 10)
    if encoding.startswith("bayer"):
        src = RNG.integers(0, 65536 if encoding.endswith("16") else 256, (h, w),
                           dtype=np.uint16 if encoding.endswith("16") else np.uint8)
    elif encoding.startswith("nv"):
        src = RNG.integers(0, 256, (h, w), dtype=np.uint8)
    else:
        src = RNG.integers(0, 256, (h, w, 2), dtype=np.uint8)
    msg = plain(src, encoding)
    ours = image_to_bgr8(msg)
    theirs = rosbags_image.message_to_cvimage(msg, "bgr8")
    assert ours.shape == theirs.shape and ours.shape[2] == 3
    np.testing.assert_array_equal(ours, theirs)


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
