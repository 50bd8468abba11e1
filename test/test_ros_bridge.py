"""The node's image codec with the real ROS 2 cv_bridge and without it: over every encoding, odd and even sizes,
row paddings (whole pixels or not), both byte orders and malformed headers, the decoded arrays are identical (or
both sides reject the message with the same kind), and the output Images are byte for byte the same."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

pytest.importorskip("rclpy")
pytestmark = pytest.mark.ros

from sensor_msgs.msg import Image  # noqa: E402

from ecmnet_core.image_messages import PLANAR_420, SUPPORTED_ENCODINGS, ImageConversionError, encoding_info  # noqa: E402
from ecmnet_ros.bridge import CV_BRIDGE_ENCODINGS, ImageCodec  # noqa: E402
from ecmnet_ros.runtime import make_header  # noqa: E402

cv_bridge = pytest.importorskip("cv_bridge", reason="the real ROS 2 cv_bridge (../shared/ros2_python/install.sh)")
RNG = np.random.default_rng(7)


def message(encoding: str, h: int, w: int, pad: int = 0, big: bool = False, data_delta: int = 0,
            step_override: int | None = None) -> Image:
    info = encoding_info(encoding)
    rows = h * 3 // 2 if encoding in PLANAR_420 else h
    dtype = np.dtype(info.dtype).newbyteorder(">" if big else "<")
    high = 65536 if dtype.itemsize == 2 else 256
    pixels = RNG.integers(0, high, (rows, w, info.channels)).astype(dtype)
    packed = pixels.reshape(rows, -1).view(np.uint8)
    step = packed.shape[1] + pad
    data = np.zeros((rows, step), np.uint8)
    data[:, : packed.shape[1]] = packed
    raw = data.tobytes()
    raw = raw[:len(raw) + data_delta] if data_delta < 0 else raw + b"\0" * data_delta
    return Image(header=make_header(3, "cam"), height=h, width=w, encoding=encoding, is_bigendian=int(big),
                 step=step if step_override is None else step_override, data=raw)


def corpus() -> list[tuple[str, Image]]:
    cases = []
    for encoding, (h, w), pad, big in itertools.product(SUPPORTED_ENCODINGS, [(6, 10), (5, 7), (1, 1)], [0, 1, 8],
                                                        [False, True]):
        cases.append((f"{encoding} {h}x{w} pad {pad} {'BE' if big else 'LE'}", message(encoding, h, w, pad, big)))
    for encoding in ("bgr8", "mono16", "bayer_rggb8", "yuv422", "nv12"):  # malformed: each is rejected by kind
        cases += [(f"{encoding} short data", message(encoding, 6, 10, data_delta=-3)),
                  (f"{encoding} long data", message(encoding, 6, 10, data_delta=5)),
                  (f"{encoding} step too small", message(encoding, 6, 10, step_override=1)),
                  (f"{encoding} zero size", Image(height=0, width=10, encoding=encoding, step=30, data=b""))]
    cases.append(("unknown encoding", Image(height=2, width=2, encoding="32FC7", step=8, data=bytes(16))))
    return cases


def outcome(codec: ImageCodec, msg: Image):
    try:
        return codec.decode(msg, max_pixels=10_000)
    except ImageConversionError as exc:
        return ("rejected", exc.kind)


CORPUS = corpus()


@pytest.mark.parametrize("name,msg", CORPUS, ids=[c[0] for c in CORPUS])
def test_decoding_with_and_without_cv_bridge_is_identical(name, msg):
    with_bridge, core = ImageCodec(use_cv_bridge=True), ImageCodec(use_cv_bridge=False)
    assert with_bridge.backend == "cv_bridge" and core.backend == "ecmnet_core"
    got, expected = outcome(with_bridge, msg), outcome(core, msg)
    if isinstance(expected, tuple) or isinstance(got, tuple):
        assert got == expected
    else:
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)


def test_cv_bridge_takes_the_messages_it_converts_correctly():
    codec = ImageCodec()
    assert codec.bridge_decodes(message("bgr8", 6, 10)) and codec.bridge_decodes(message("mono16", 6, 10, pad=2))
    assert codec.bridge_decodes(message("bayer_rggb16", 6, 10)) and codec.bridge_decodes(message("yuv422", 6, 10))
    assert not codec.bridge_decodes(message("bgr16", 6, 10, pad=8))  # padding of 8 bytes, pixels of 6
    assert not codec.bridge_decodes(message("mono16", 6, 10, big=True))  # upstream fails on big-endian data
    assert not codec.bridge_decodes(message("nv12", 6, 10)) and "uyvy" not in CV_BRIDGE_ENCODINGS


@pytest.mark.parametrize("encoding,array", [
    ("mono8", RNG.integers(0, 256, (7, 9), dtype=np.uint8)),
    ("bgr8", RNG.integers(0, 256, (7, 9, 3), dtype=np.uint8)),
])
def test_output_images_are_the_same_built_either_way(encoding, array):
    header = make_header(1_000_000_123, "cam")
    a = ImageCodec(True).encode(array, encoding, header)
    b = ImageCodec(False).encode(array, encoding, header)
    for field in ("height", "width", "encoding", "is_bigendian", "step"):
        assert getattr(a, field) == getattr(b, field), field
    assert bytes(a.data) == bytes(b.data) and a.header == b.header
