"""Image message <-> numpy conversions (our replacement for cv_bridge; no ROS build needed).

Every decoder works on anything with the ``sensor_msgs`` fields: rclpy messages (``data`` is an ``array.array``),
``rosbags`` messages (``data`` is a numpy array) or plain objects (``bytes``). Decoding honours ``step`` (row
padding) and ``is_bigendian`` and returns a zero-copy view where the encoding allows it.

* :func:`image_to_array` - ``sensor_msgs/Image`` -> array in the message's own layout (``passthrough``).
* :func:`image_to_bgr8` / :func:`compressed_to_bgr8` / :func:`message_to_bgr8` - what the segmenter eats:
  HxWx3 BGR uint8, or HxW uint8 for single-channel images.
* :func:`check_image` / :func:`check_compressed` - cheap validation without decoding (run on every received frame).
* :func:`array_to_image` / :func:`array_to_compressed` - numpy -> message (``arr.tobytes()``: assigning a numpy
  array to ``Image.data`` is ~50x slower in rclpy).

Every failure raises :class:`ImageConversionError` whose ``kind`` names the problem (``encoding``, ``size``,
``length``, ``too_large``, ``decode``) so the node can count them per kind.
"""

from __future__ import annotations

import atexit
import os
import re
import struct
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np


class ImageConversionError(ValueError):
    """A message that cannot be turned into an image; ``kind`` is a short machine-readable reason."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class EncodingInfo:
    """Memory layout of one ``sensor_msgs/image_encodings`` name."""

    channels: int
    dtype: str  # numpy base type, byte order applied from is_bigendian
    to_bgr: int | None = None  # cv2 colour conversion to BGR (None: already BGR or single channel)


_ENCODINGS: dict[str, EncodingInfo] = {
    "bgr8": EncodingInfo(3, "u1"),
    "rgb8": EncodingInfo(3, "u1", cv2.COLOR_RGB2BGR),
    "bgra8": EncodingInfo(4, "u1", cv2.COLOR_BGRA2BGR),
    "rgba8": EncodingInfo(4, "u1", cv2.COLOR_RGBA2BGR),
    "mono8": EncodingInfo(1, "u1"),
    "bgr16": EncodingInfo(3, "u2"),
    "rgb16": EncodingInfo(3, "u2", cv2.COLOR_RGB2BGR),
    "bgra16": EncodingInfo(4, "u2", cv2.COLOR_BGRA2BGR),
    "rgba16": EncodingInfo(4, "u2", cv2.COLOR_RGBA2BGR),
    "mono16": EncodingInfo(1, "u2"),
    "8UC1": EncodingInfo(1, "u1"),
    "8UC3": EncodingInfo(3, "u1"),
    "8UC4": EncodingInfo(4, "u1", cv2.COLOR_BGRA2BGR),
    "16UC1": EncodingInfo(1, "u2"),
    "16UC3": EncodingInfo(3, "u2"),
    "bayer_rggb8": EncodingInfo(1, "u1", cv2.COLOR_BayerRGGB2BGR),
    "bayer_bggr8": EncodingInfo(1, "u1", cv2.COLOR_BayerBGGR2BGR),
    "bayer_gbrg8": EncodingInfo(1, "u1", cv2.COLOR_BayerGBRG2BGR),
    "bayer_grbg8": EncodingInfo(1, "u1", cv2.COLOR_BayerGRBG2BGR),
    "bayer_rggb16": EncodingInfo(1, "u2", cv2.COLOR_BayerRGGB2BGR),
    "bayer_bggr16": EncodingInfo(1, "u2", cv2.COLOR_BayerBGGR2BGR),
    "bayer_gbrg16": EncodingInfo(1, "u2", cv2.COLOR_BayerGBRG2BGR),
    "bayer_grbg16": EncodingInfo(1, "u2", cv2.COLOR_BayerGRBG2BGR),
    # packed 4:2:2, two bytes per pixel; "yuv422" / "yuv422_yuy2" are the deprecated ROS names
    "uyvy": EncodingInfo(2, "u1", cv2.COLOR_YUV2BGR_UYVY),
    "yuv422": EncodingInfo(2, "u1", cv2.COLOR_YUV2BGR_UYVY),
    "yuyv": EncodingInfo(2, "u1", cv2.COLOR_YUV2BGR_YUYV),
    "yuv422_yuy2": EncodingInfo(2, "u1", cv2.COLOR_YUV2BGR_YUYV),
    # planar 4:2:0: a Y plane of ``height`` rows, then an interleaved chroma plane of height/2 rows. As in
    # sensor_msgs/image_encodings (getHeightScaling: 1.5) and cv_bridge, ``height`` is the picture's, so the data
    # holds ``step * height * 3/2`` bytes (rosbags-image reads ``height`` as both planes' rows instead)
    "nv12": EncodingInfo(1, "u1", cv2.COLOR_YUV2BGR_NV12),
    "nv21": EncodingInfo(1, "u1", cv2.COLOR_YUV2BGR_NV21),
}
#: 4:2:0 encodings (even widths and heights; the data holds ``height * 3/2`` rows).
PLANAR_420 = ("nv12", "nv21")
#: 4:2:2 encodings: one chroma pair per two pixels, so even widths only.
PACKED_422 = ("uyvy", "yuv422", "yuyv", "yuv422_yuy2")

#: Every ``Image.encoding`` the decoders accept.
SUPPORTED_ENCODINGS: tuple[str, ...] = tuple(_ENCODINGS)


def encoding_info(encoding: str) -> EncodingInfo:
    """Layout of ``encoding``; unknown names raise :class:`ImageConversionError` (kind ``encoding``)."""
    info = _ENCODINGS.get(encoding)
    if info is None:
        raise ImageConversionError("encoding", f"unsupported image encoding {encoding!r} "
                                               f"(supported: {', '.join(SUPPORTED_ENCODINGS)})")
    return info


def _buffer_len(data: Any) -> int:
    return memoryview(data).nbytes if not isinstance(data, np.ndarray) else data.nbytes


def data_rows(encoding: str, height: int) -> int:
    """Rows of ``step`` bytes in an Image's data: ``height``, or ``height * 3/2`` for the 4:2:0 formats."""
    return height * 3 // 2 if encoding in PLANAR_420 else height


# -------------------------------------------------------------------------------------------- raw Image
def check_image(msg: Any, max_pixels: int | None = None) -> EncodingInfo:
    """Validate an ``Image``'s header fields against its payload without decoding it.

    Checks: known encoding, non-zero size, at most ``max_pixels`` pixels, even sizes where chroma is subsampled
    (4:2:2 widths, 4:2:0 widths and heights), ``step`` >= one packed row (a larger step is row padding, legal),
    ``len(data) == step * rows`` with rows = ``height`` (x 3/2 for the 4:2:0 formats).
    """
    info = encoding_info(msg.encoding)
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise ImageConversionError("size", f"zero-size image ({width}x{height}, encoding {msg.encoding})")
    if max_pixels is not None and height * width > max_pixels:
        raise ImageConversionError("too_large", f"image {width}x{height} has {height * width} pixels, above the "
                                                f"max_image_pixels limit {max_pixels}")
    if msg.encoding in PLANAR_420 and (height % 2 or width % 2):
        raise ImageConversionError("size", f"{msg.encoding} (4:2:0) needs an even width and height, got "
                                           f"{width}x{height}")
    if msg.encoding in PACKED_422 and width % 2:
        raise ImageConversionError("size", f"{msg.encoding} (4:2:2) needs an even width, got {width}x{height}")
    row_bytes = width * info.channels * np.dtype(info.dtype).itemsize
    if step < row_bytes:
        raise ImageConversionError("length", f"step {step} is smaller than one row of {width} {msg.encoding} "
                                             f"pixels ({row_bytes} bytes)")
    rows = data_rows(msg.encoding, height)
    expected = step * rows
    got = _buffer_len(msg.data)
    if got != expected:
        rows_text = f"step x height x 3/2 = {step} x {height} x 3/2" if rows != height else \
            f"step x height = {step} x {height}"
        raise ImageConversionError("length", f"data length {got} != {rows_text} = {expected} "
                                             f"({msg.encoding} {width}x{height})")
    return info


def image_to_array(msg: Any, max_pixels: int | None = None) -> np.ndarray:
    """``sensor_msgs/Image`` -> (H, W) or (H, W, C) array in the message's channel order and depth.

    A zero-copy, read-only view of ``msg.data`` (16-bit data in the native byte order is not copied either).
    The 4:2:0 formats come back as their (height * 3/2, width) byte planes, ready for ``cv2.cvtColor``.
    """
    info = check_image(msg, max_pixels)
    width, step = int(msg.width), int(msg.step)
    height = data_rows(msg.encoding, int(msg.height))
    dtype = np.dtype(info.dtype).newbyteorder(">" if msg.is_bigendian else "<")
    buf = np.frombuffer(msg.data, np.uint8)
    array = np.ndarray((height, width, info.channels), dtype=dtype, buffer=buf,
                       strides=(step, info.channels * dtype.itemsize, dtype.itemsize))
    if not dtype.isnative:
        array = array.astype(dtype.newbyteorder("="))
    array.flags.writeable = False
    return array[..., 0] if info.channels == 1 else array


def _to_8bit(array: np.ndarray) -> np.ndarray:
    """16-bit -> 8-bit scaled by 255/65535 and truncated, exactly as ``rosbags.image`` does (so offline replay
    and the node see the same pixels)."""
    return np.multiply(array, 255.0 / 65535.0).astype(np.uint8) if array.dtype != np.uint8 else array


def image_to_bgr8(msg: Any, max_pixels: int | None = None) -> np.ndarray:
    """``sensor_msgs/Image`` -> HxWx3 BGR uint8 (colour encodings) or HxW uint8 (mono, 16UC1 ...)."""
    return array_to_bgr8(image_to_array(msg, max_pixels), msg.encoding)


def array_to_bgr8(array: np.ndarray, encoding: str) -> np.ndarray:
    """An Image's pixels as :func:`image_to_array` (or cv_bridge's ``passthrough``) gives them -> what the
    Segmenter takes: HxWx3 BGR uint8 for colour encodings, HxW uint8 for single-channel ones."""
    info = encoding_info(encoding)
    if info.to_bgr is None:
        return _to_8bit(array)
    if encoding.startswith("bayer_"):
        return _to_8bit(cv2.cvtColor(np.ascontiguousarray(array), info.to_bgr))
    if info.channels == 2 or encoding in PLANAR_420:
        return cv2.cvtColor(np.ascontiguousarray(array), info.to_bgr)
    return cv2.cvtColor(_to_8bit(array), info.to_bgr)


# ------------------------------------------------------------------------------------- CompressedImage
def compressed_dimensions(data: bytes | memoryview) -> tuple[int, int] | None:
    """(height, width) read from a PNG or JPEG header without decoding; None when not found.

    Lets the node refuse decompression bombs before cv2 allocates the full image.
    """
    head = bytes(data[:8])
    if head == b"\x89PNG\r\n\x1a\n":
        if len(data) < 24:
            return None
        width, height = struct.unpack(">II", bytes(data[16:24]))
        return height, width
    if head[:2] != b"\xff\xd8":
        return None
    view = memoryview(data)
    i, n = 2, len(view)
    while i + 4 <= n:
        if view[i] != 0xFF:
            return None
        marker = view[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            i += 2
            continue
        length = (view[i + 2] << 8) | view[i + 3]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn carries the frame size
            if i + 9 > n:
                return None
            height, width = struct.unpack(">HH", bytes(view[i + 5:i + 9]))
            return height, width
        i += 2 + length
    return None


#: How the image streams cv2 decodes begin (JPEG, PNG, BMP, TIFF both byte orders; WebP is RIFF....WEBP).
_IMAGE_MAGIC = (b"\xff\xd8", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")


def check_compressed(msg: Any, max_pixels: int | None = None) -> tuple[int, int] | None:
    """Validate a ``CompressedImage`` cheaply: non-empty payload, size within ``max_pixels`` when readable."""
    if _buffer_len(msg.data) == 0:
        raise ImageConversionError("size", f"empty CompressedImage (format {msg.format!r})")
    view = memoryview(np.frombuffer(msg.data, np.uint8))
    dims = compressed_dimensions(view)
    if dims is None and not bytes(view[:12]).startswith(_IMAGE_MAGIC) and bytes(view[8:12]) != b"WEBP":
        # rejected here, on arrival, so that garbage is counted as bad and not as a stale frame the slot dropped
        raise ImageConversionError("decode", f"CompressedImage (format {msg.format!r}, {_buffer_len(msg.data)} "
                                             "bytes) is not an image stream: no JPEG, PNG, BMP, TIFF or WebP header")
    _check_stream_end(view, msg.format)
    if dims is not None:
        height, width = dims
        if height == 0 or width == 0:
            raise ImageConversionError("size", f"zero-size compressed image ({width}x{height}, format {msg.format!r})")
        if max_pixels is not None and height * width > max_pixels:
            raise ImageConversionError("too_large", f"compressed image {width}x{height} has {height * width} pixels, "
                                                    f"above the max_image_pixels limit {max_pixels}")
    return dims


#: How far from the end a stream's end marker may sit (encoders and cameras may pad or append a few bytes).
_END_WINDOW = 256


def _check_stream_end(view: memoryview, fmt: str) -> None:
    """A JPEG without its end-of-image marker or a PNG without its IEND chunk near the end was cut short: rejected
    on arrival (counted as bad, not as a stale frame the newest-frame slot replaced before decoding it)."""
    head, tail = bytes(view[:8]), bytes(view[-_END_WINDOW:])
    if head.startswith(b"\xff\xd8") and b"\xff\xd9" not in tail:
        raise ImageConversionError("decode", f"JPEG CompressedImage (format {fmt!r}, {len(view)} bytes) is cut "
                                             "short: no end-of-image marker")
    if head.startswith(b"\x89PNG") and b"IEND" not in tail:
        raise ImageConversionError("decode", f"PNG CompressedImage (format {fmt!r}, {len(view)} bytes) is cut "
                                             "short: no IEND chunk")


_DECODE_LOCK = threading.Lock()
_SINK: Any = None  # decode_quietly's capture file, made on first use
#: Lines the image libraries print on their own (libpng's errors and warnings, libjpeg's warnings).
_LIBRARY_LINE = re.compile(r"^(libpng (error|warning)|Corrupt JPEG data|Premature end of JPEG|Invalid JPEG|"
                           r"Unsupported marker|Bogus |JPEG datastream)")


def decode_quietly(buffer: np.ndarray) -> tuple[np.ndarray | None, str]:
    """``cv2.imdecode(buffer, IMREAD_UNCHANGED)`` and what libpng/libjpeg said about it: (image or None, their
    lines joined by "; ").

    The libraries write to the process's stderr directly, a line per broken frame that no throttle can reach; here
    it is captured (file descriptor 2 points at a temporary file while the decoder runs; one file for the process,
    emptied after each frame) so that callers can put it into their own, throttled, report. Anything else written
    to stderr in that window (another thread's log line) is written back right after."""
    global _SINK
    with _DECODE_LOCK:
        try:
            saved = os.dup(2)
        except OSError:  # no stderr to redirect
            return cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED), ""
        try:
            if _SINK is None:
                _SINK = tempfile.TemporaryFile()  # unlinked at once: nothing is left behind
                atexit.register(_SINK.close)
            sink = _SINK.fileno()
            os.dup2(sink, 2)
            try:
                image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
            finally:
                os.dup2(saved, 2)
            size = os.lseek(sink, 0, os.SEEK_END)
            text = os.pread(sink, size, 0).decode("utf-8", "replace") if size else ""
            if size:
                os.ftruncate(sink, 0)
            os.lseek(sink, 0, os.SEEK_SET)
        finally:
            os.close(saved)
    lines = text.splitlines(keepends=True)
    library = [line.strip() for line in lines if _LIBRARY_LINE.match(line)]
    other = "".join(line for line in lines if not _LIBRARY_LINE.match(line))
    if other:
        os.write(2, other.encode())
    return image, "; ".join(library)


def compressed_to_bgr8(msg: Any, max_pixels: int | None = None) -> np.ndarray:
    """``sensor_msgs/CompressedImage`` (JPEG, PNG, anything cv2 reads) -> HxWx3 BGR or HxW uint8."""
    check_compressed(msg, max_pixels)
    image, library = decode_quietly(np.frombuffer(msg.data, np.uint8))
    if image is None or image.size == 0:
        raise ImageConversionError("decode", f"cannot decode CompressedImage (format {msg.format!r}, "
                                             f"{_buffer_len(msg.data)} bytes): corrupt or unsupported codec"
                                             + (f" ({library})" if library else ""))
    if max_pixels is not None and image.shape[0] * image.shape[1] > max_pixels:
        raise ImageConversionError("too_large", f"compressed image {image.shape[1]}x{image.shape[0]} is above the "
                                                f"max_image_pixels limit {max_pixels}")
    image = _to_8bit(image)
    if image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    elif image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    return image


def message_to_bgr8(msg: Any, max_pixels: int | None = None) -> np.ndarray:
    """Either message type -> what :class:`ecmnet_core.inference.Segmenter` takes (CompressedImage has ``format``)."""
    if hasattr(msg, "format"):
        return compressed_to_bgr8(msg, max_pixels)
    return image_to_bgr8(msg, max_pixels)


def check_message(msg: Any, max_pixels: int | None = None) -> None:
    """Cheap validation of either message type (see :func:`check_image`, :func:`check_compressed`)."""
    if hasattr(msg, "format"):
        check_compressed(msg, max_pixels)
    else:
        check_image(msg, max_pixels)


# ------------------------------------------------------------------------------------ numpy -> message
_DEFAULT_ENCODING = {(np.dtype(np.uint8), 1): "mono8", (np.dtype(np.uint8), 3): "bgr8",
                     (np.dtype(np.uint8), 4): "bgra8", (np.dtype(np.uint16), 1): "mono16",
                     (np.dtype(np.uint16), 3): "bgr16", (np.dtype(np.uint16), 4): "bgra16"}


def array_to_image(array: np.ndarray, encoding: str | None = None, header: Any = None, msg_type: Any = None) -> Any:
    """(H, W) / (H, W, C) array -> ``sensor_msgs/Image`` with a packed ``step`` and the native byte order.

    ``encoding`` None picks mono8/bgr8/bgra8 (or the 16-bit ones) from dtype and channels. ``msg_type``: the
    message class to build (default rclpy's ``sensor_msgs.msg.Image``; a ``rosbags`` class also works, it gets
    ``data`` as a uint8 numpy array). ``header`` is used as is (stamp + frame_id of the source image).
    """
    array = np.asarray(array)
    if array.ndim not in (2, 3) or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"array_to_image: expected an HxW or HxWxC array, got shape {array.shape}")
    channels = 1 if array.ndim == 2 else array.shape[2]
    if encoding is None:
        encoding = _DEFAULT_ENCODING.get((array.dtype, channels))
        if encoding is None:
            raise ValueError(f"array_to_image: no default encoding for {array.dtype} with {channels} channels")
    info = encoding_info(encoding)
    if encoding in PLANAR_420:
        raise ValueError(f"array_to_image: writing {encoding} is not supported")
    if info.channels != channels or np.dtype(info.dtype) != array.dtype.newbyteorder("="):
        raise ValueError(f"array_to_image: encoding {encoding} needs {info.channels} channel(s) of {info.dtype}, "
                         f"got {channels} of {array.dtype}")
    height, width = array.shape[:2]
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("=")).tobytes()
    fields = dict(height=height, width=width, encoding=encoding, is_bigendian=int(sys.byteorder == "big"),
                  step=width * channels * array.dtype.itemsize)
    if msg_type is None:
        from sensor_msgs.msg import Image  # imported here: the decoders need no ROS

        msg = Image(**fields, data=data)
        if header is not None:
            msg.header = header
        return msg
    return msg_type(header=header, data=np.frombuffer(data, np.uint8), **fields)


def array_to_compressed(array: np.ndarray, fmt: str = "jpeg", header: Any = None, quality: int = 90,
                        msg_type: Any = None) -> Any:
    """BGR (or mono) uint8 array -> ``sensor_msgs/CompressedImage`` in ``jpeg`` or ``png``.

    Never use ``jpeg`` for label images: it changes class ids along boundaries (use ``png``).
    """
    fmt = fmt.lower()
    if fmt not in ("jpeg", "jpg", "png"):
        raise ValueError(f"array_to_compressed: format must be jpeg or png, got {fmt!r}")
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if fmt != "png" else []
    ok, buf = cv2.imencode(".png" if fmt == "png" else ".jpg", array, params)
    if not ok:
        raise ValueError(f"array_to_compressed: cv2 could not encode a {array.shape} {array.dtype} array as {fmt}")
    fmt = "png" if fmt == "png" else "jpeg"
    if msg_type is None:
        from sensor_msgs.msg import CompressedImage

        msg = CompressedImage(format=fmt, data=buf.tobytes())
        if header is not None:
            msg.header = header
        return msg
    return msg_type(header=header, format=fmt, data=buf.reshape(-1))
