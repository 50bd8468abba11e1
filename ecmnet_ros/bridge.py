"""Images in and out of the node: the real ROS 2 ``cv_bridge`` where it converts correctly, the core codec
(:mod:`ecmnet_core.image_messages`) where it cannot, or where it is not installed.

cv_bridge 3.4 decodes every ``sensor_msgs/image_encodings`` name the node takes except the 4:2:0 formats
(``nv12``/``nv21``) and the ``uyvy``/``yuyv`` names, and it decodes wrongly (upstream limits) big-endian data under
NumPy 2 and a row padding that is not a whole number of pixels; those messages go through the core codec. Every
message is validated by the core first (:func:`~ecmnet_core.image_messages.check_image`), so a bad message is
rejected with the same kind either way, and both decoders give identical arrays (``test_ros_bridge.py``).
Compressed input keeps the core decoder (``cv2.imdecode``, what cv_bridge calls too).

Per-frame cost of both: ``python -m ecmnet_ros.bridge [--runs N]``.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from ecmnet_core.image_messages import (
    PLANAR_420,
    SUPPORTED_ENCODINGS,
    EncodingInfo,
    ImageConversionError,
    array_to_bgr8,
    array_to_image,
    check_image,
    compressed_to_bgr8,
    image_to_bgr8,
)

try:  # the real ROS 2 cv_bridge (../shared/ros2_python/install.sh; never PyPI's "cv-bridge", a ROS 1 port)
    from cv_bridge import CvBridge, CvBridgeError
except ImportError:  # a pip install without ROS: the core codec does everything
    CvBridge = None  # type: ignore[assignment, misc]
    CvBridgeError = Exception  # type: ignore[assignment, misc]

#: The encodings cv_bridge 3.4 decodes (passthrough); the rest are the core codec's.
CV_BRIDGE_ENCODINGS = frozenset(SUPPORTED_ENCODINGS) - frozenset(PLANAR_420) - {"uyvy", "yuyv"}


class ImageCodec:
    """Decode input Images to what the Segmenter takes and build output Images, through cv_bridge when it is
    installed and converts the message correctly (``use_cv_bridge=False``: always the core codec)."""

    def __init__(self, use_cv_bridge: bool = True) -> None:
        self.bridge = CvBridge() if use_cv_bridge and CvBridge is not None else None

    @property
    def backend(self) -> str:
        return "cv_bridge" if self.bridge is not None else "ecmnet_core"

    def bridge_decodes(self, msg: Any, info: EncodingInfo | None = None) -> bool:
        """True when cv_bridge converts this Image exactly (``info``: its :func:`check_image` result, if at hand)."""
        if self.bridge is None or msg.encoding not in CV_BRIDGE_ENCODINGS or msg.is_bigendian:
            return False
        info = info or check_image(msg)
        pixel = info.channels * np.dtype(info.dtype).itemsize
        return (int(msg.step) - int(msg.width) * pixel) % pixel == 0  # padding in whole pixels

    def decode(self, msg: Any, max_pixels: int | None = None) -> np.ndarray:
        """Image or CompressedImage -> HxWx3 BGR uint8 (HxW for single-channel encodings);
        :class:`ImageConversionError` (with its ``kind``) for a message that cannot be decoded."""
        if hasattr(msg, "format"):
            return compressed_to_bgr8(msg, max_pixels)
        info = check_image(msg, max_pixels)
        if not self.bridge_decodes(msg, info):
            return image_to_bgr8(msg, max_pixels)
        try:
            array = self.bridge.imgmsg_to_cv2(msg, desired_encoding="passthrough")
        except (CvBridgeError, TypeError, ValueError) as exc:
            raise ImageConversionError("encoding", f"cv_bridge cannot convert {msg.encoding}: {exc}") from None
        return array_to_bgr8(array, msg.encoding)

    def encode(self, array: np.ndarray, encoding: str, header: Any) -> Any:
        """An output Image (labels, confidence: mono8; colour, overlay: bgr8) with the input's header."""
        if self.bridge is not None:
            return self.bridge.cv2_to_imgmsg(np.ascontiguousarray(array), encoding=encoding, header=header)
        return array_to_image(array, encoding, header)


def bench(runs: int = 50) -> list[dict[str, Any]]:
    """Median ms per frame of decode (bgr8, rgb8, mono16 in) and encode (mono8 labels, bgr8 colour out) with
    cv_bridge and with the core codec, at 360x480 and 1920x1080."""
    import torch

    from ecmnet_core.bench.timing import time_fn
    from ecmnet_ros.runtime import make_header

    def median_ms(fn: Any) -> float:
        return time_fn(fn, runs, warmup=1, device=torch.device("cpu")).median

    codecs = {"cv_bridge": ImageCodec(True), "ecmnet_core": ImageCodec(False)}
    rng = np.random.default_rng(0)
    rows = []
    for h, w in ((360, 480), (1080, 1920)):
        bgr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        inputs = {"bgr8": bgr, "rgb8": bgr[..., ::-1], "mono16": (bgr[..., 0].astype(np.uint16) * 257)}
        header = make_header(1, "bench")
        for name, codec in codecs.items():
            if name == "cv_bridge" and codec.bridge is None:
                continue
            for encoding, array in inputs.items():
                msg = array_to_image(np.ascontiguousarray(array), encoding, header)
                rows.append({"size": f"{h}x{w}", "codec": name, "op": f"decode {encoding}",
                             "ms": median_ms(lambda m=msg, c=codec: c.decode(m))})
            for encoding, array in (("mono8", bgr[..., 0].copy()), ("bgr8", bgr)):
                rows.append({"size": f"{h}x{w}", "codec": name, "op": f"encode {encoding}",
                             "ms": median_ms(lambda a=array, e=encoding, c=codec, hd=header: c.encode(a, e, hd))})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ecmnet_ros.bridge", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="timed calls per figure (median)")
    args = parser.parse_args(argv)
    for row in bench(args.runs):
        print(f"{row['size']:>10}  {row['codec']:<12} {row['op']:<14} {row['ms']:8.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
