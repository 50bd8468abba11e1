"""Bad messages (unknown encoding, zero size, wrong data length, corrupt/empty JPEG, giant images): each gives a
warning naming the topic and the problem, a counter in /diagnostics, and the node keeps segmenting."""

from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("rclpy")
pytestmark = [pytest.mark.ros, pytest.mark.filterwarnings("ignore:RANDOM WEIGHTS")]

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402

from ecmnet_core.image_messages import array_to_compressed  # noqa: E402
from ecmnet_ros.runtime import TopicCollector, connected, make_header, stamp_ns, wait_for  # noqa: E402

TIMEOUT = 20.0


def diag_values(messages: list[DiagnosticArray], topic: str) -> dict[str, str]:
    """Values of the newest diagnostics status for ``topic`` (empty before the first one)."""
    for msg in reversed(messages):
        for status in msg.status:
            if status.name.endswith(f": {topic}"):
                return {kv.key: kv.value for kv in status.values}
    return {}


def read_until(capfd, needle: str, timeout: float = 5.0) -> str:
    """stderr captured until ``needle`` appears (the warning follows the counter bump by a moment)."""
    log: list[str] = []
    wait_for(lambda: log.append(capfd.readouterr().err) or needle in "".join(log), timeout)
    text = "".join(log)
    assert needle in text, text[-2000:]
    return text


def test_each_bad_message_warns_counts_and_node_survives(segmenter_node, probe, image_msg, capfd):
    node = segmenter_node(image_topics=["/raw/image", "/jpg/image/compressed"])
    diagnostics = TopicCollector(probe, DiagnosticArray, "/diagnostics", qos=100)
    labels = {"raw": TopicCollector(probe, Image, "/raw/segmenter/labels"),
              "jpg": TopicCollector(probe, Image, "/jpg/segmenter/labels")}
    raw = probe.create_publisher(Image, "/raw/image", 10)
    jpg = probe.create_publisher(CompressedImage, "/jpg/image/compressed", 10)
    assert wait_for(lambda: connected(raw, jpg, *(s.subscriptions[0] for s in node.streams),
                                      *(c.subscription for c in labels.values())), TIMEOUT)
    good = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    assert node.set_parameters([Parameter("max_image_pixels", value=64 * 96)])[0].successful

    def bad_image(**fields):
        msg = image_msg(good, "bgr8", 1)
        for key, value in fields.items():
            setattr(msg, key, value)
        return msg

    cases = [  # (publisher, message, kind counted, text in the warning)
        (raw, bad_image(encoding="bayer_xyz9"), "encoding", "unsupported image encoding 'bayer_xyz9'"),
        (raw, bad_image(width=0, height=0, step=0, data=b""), "size", "zero-size image"),
        (raw, bad_image(data=bytes(100)), "length", "data length 100 != step x height"),
        (raw, image_msg(np.zeros((65, 96, 3), np.uint8), "bgr8", 1), "too_large", "max_image_pixels limit 6144"),
        (jpg, CompressedImage(header=make_header(1), format="jpeg", data=b"\xff\xd8\xff\xe0" + bytes(64)),
         "decode", "cut short: no end-of-image marker"),  # rejected on arrival
        (jpg, CompressedImage(header=make_header(1), format="jpeg", data=b""), "size", "empty CompressedImage"),
    ]
    expected: dict[tuple[str, str], int] = {}
    for pub, msg, kind, text in cases:
        topic = "/raw/image" if pub is raw else "/jpg/image/compressed"
        expected[(topic, kind)] = expected.get((topic, kind), 0) + 1
        count = expected[(topic, kind)]
        pub.publish(msg)
        # (the node's diagnostics() builds exactly what the 1 Hz timer publishes; checked on /diagnostics below)
        assert wait_for(lambda t=topic, k=kind, c=count: diag_values([node.diagnostics()], t).get(
            f"bad_messages_{k}") == str(c), TIMEOUT), f"{kind} not counted for {topic}"
        values = diag_values([node.diagnostics()], topic)
        assert text in values["last_bad_message"], values["last_bad_message"]
        log = read_until(capfd, f"{topic}: bad message skipped ({kind})")
        assert text in log, log[-2000:]

        # the node is alive and still segments good frames on both inputs
        stamp = 1000 + len(labels["raw"].messages)
        raw.publish(image_msg(good, "bgr8", stamp))
        assert wait_for(lambda s=stamp: any(stamp_ns(m.header) == s for m in labels["raw"].messages), TIMEOUT)
    jpg.publish(array_to_compressed(good, "jpeg", make_header(77)))
    assert wait_for(lambda: any(stamp_ns(m.header) == 77 for m in labels["jpg"].messages), TIMEOUT)

    # repeated bad messages of one kind are counted every time but warned about at most once per 5 s
    for _ in range(5):
        raw.publish(bad_image(encoding="bayer_xyz9"))
        time.sleep(0.05)  # the depth-1 best-effort input may legitimately discard back-to-back messages
    assert wait_for(lambda: diag_values(diagnostics.messages, "/raw/image").get("bad_messages_encoding") == "6",
                    TIMEOUT), "bad-message counters missing on /diagnostics"
    assert diag_values(diagnostics.messages, "/jpg/image/compressed").get("bad_messages_decode") == "1"
    assert capfd.readouterr().err.count("bad message skipped (encoding)") <= 1
    status = next(s for s in node.diagnostics().status if s.name.endswith(": /raw/image"))
    assert "bad messages" in status.message and node.streams[0].errors.total == 9


def test_every_encoding_at_odd_sizes_gets_labels_of_the_image_size(segmenter_node, probe):
    """Through the node: every accepted encoding at odd and even sizes, padded rows included. Valid frames are
    answered with ``~/labels`` of the image's pixel size and its header; sizes a subsampled format cannot have
    are counted as bad (``size``) and answered with nothing."""
    from ecmnet_core.image_messages import SUPPORTED_ENCODINGS, encoding_info

    node = segmenter_node(image_topics=["/enc/image"])
    labels = TopicCollector(probe, Image, "/enc/segmenter/labels", qos=100)
    pub = probe.create_publisher(Image, "/enc/image", 10)
    assert wait_for(lambda: connected(pub, node.streams[0].subscriptions[0], labels.subscription), TIMEOUT)
    rng = np.random.default_rng(1)
    stamp, rejected = 0, 0
    for encoding in SUPPORTED_ENCODINGS:
        info = encoding_info(encoding)
        planar, packed = encoding in ("nv12", "nv21"), encoding in ("uyvy", "yuv422", "yuyv", "yuv422_yuy2")
        for h, w in [(1, 1), (3, 2), (5, 7), (6, 4), (75, 336), (357, 480)]:
            stamp += 1
            row = w * info.channels * np.dtype(info.dtype).itemsize
            step = row + (3 if stamp % 2 else 0)
            rows = h * 3 // 2 if planar else h
            data = rng.integers(0, 256, rows * step, dtype=np.uint8).tobytes()
            msg = Image(header=make_header(stamp), height=h, width=w, encoding=encoding, step=step, data=data)
            valid = not ((planar and (h % 2 or w % 2)) or (packed and w % 2))
            pub.publish(msg)
            if valid:
                assert wait_for(lambda s=stamp: any(stamp_ns(m.header) == s for m in labels.messages), TIMEOUT), \
                    f"{encoding} {h}x{w}: no labels"
                out = next(m for m in labels.messages if stamp_ns(m.header) == stamp)
                assert (out.height, out.width, out.encoding) == (h, w, "mono8"), f"{encoding} {h}x{w}"
            else:
                rejected += 1
                assert wait_for(lambda r=rejected: node.streams[0].errors.counts.get("size", 0) == r, TIMEOUT), \
                    f"{encoding} {h}x{w} was not counted as a bad size"
    assert node.streams[0].errors.total == rejected > 0
