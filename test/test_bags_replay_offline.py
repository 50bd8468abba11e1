"""Offline replay: the same mIoU as ``ecmnet-core eval`` on the same frames (1e-6), ground truth matched by header
stamp in any order, undecodable frames skipped and counted, report files and the output bag with predictions."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from ecmnet_core.bags import BagError, BagFrame, BagReader, BagWriteConfig, write_image_bag
from ecmnet_core.bags.make_bag import folder_frames
from ecmnet_core.bags.reader import decode_label_message
from ecmnet_core.bags.replay import replay_offline
from ecmnet_core.cli import main as cli
from ecmnet_core.data import DatasetInfo, Sample
from ecmnet_core.evaluate import evaluate_samples
from ecmnet_core.inference import InferenceConfig, Segmenter
from ecmnet_core.inference.pipeline import segment_images

# one intra-op thread (conftest): on the shared 2-core machine OpenMP spinning makes 2 threads much slower
pytestmark = pytest.mark.usefixtures("one_torch_thread")

START = 1_700_000_000.0
K = 4


def make_frames(n: int = 6, h: int = 64, w: int = 96, seed: int = 1) -> list[BagFrame]:
    """Smooth images with blocky labels, so predictions of the random model vary across the frame."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        image = cv2.resize(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
        label = cv2.resize(rng.integers(0, K, (4, 6), dtype=np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
        label[-3:] = 255
        frames.append(BagFrame(image, label, f"f{i}"))
    return frames


def segmenter(input_size: tuple[int, int] = (32, 48), dtype: str = "fp32") -> Segmenter:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random-weights warning
        return Segmenter(InferenceConfig(model="baseline", num_classes=K, input_size=input_size, warmup=0,
                                         dtype=dtype))


@pytest.fixture(scope="module")
def seg(one_torch_thread) -> Segmenter:
    return segmenter()


@pytest.fixture
def labelled(tmp_path: Path) -> tuple[Path, list[Sample], list[BagFrame]]:
    """PNG frames + labels on disk (what eval reads) and a bag built from those files (what replay reads)."""
    frames = make_frames()
    samples = []
    for sub in ("img", "lab"):
        (tmp_path / sub).mkdir()
    for f in frames:
        cv2.imwrite(str(tmp_path / "img" / f"{f.name}.png"), f.image)
        cv2.imwrite(str(tmp_path / "lab" / f"{f.name}.png"), f.label)
        samples.append(Sample(tmp_path / "img" / f"{f.name}.png", tmp_path / "lab" / f"{f.name}.png", f.name))
    custom, _, source = folder_frames(tmp_path / "img", tmp_path / "lab")
    custom.update(class_names=info().class_names, palette=[list(c) for c in info().palette])
    write_image_bag(source, BagWriteConfig(out=tmp_path / "bag", start_time=START, custom=custom))
    return tmp_path / "bag", samples, frames


def info() -> DatasetInfo:
    return DatasetInfo("synthetic", [f"c{i}" for i in range(K)], [(40 * i, 255 - 40 * i, 90) for i in range(K)], 255)


def test_offline_miou_equals_evaluator(labelled, seg: Segmenter) -> None:
    """Same frames, same Segmenter (network 32x48, so the resize path is exercised): identical confusion matrix."""
    bag, samples, _ = labelled
    expected = evaluate_samples(seg, samples, info())
    with BagReader(bag) as reader:
        report = replay_offline(reader, seg)
    assert report.confusion.matrix.tolist() == expected["confusion_matrix"]
    assert report.confusion.miou() == pytest.approx(expected["miou"], abs=1e-6)
    assert report.confusion.miou_framework() == pytest.approx(expected["miou_framework"], abs=1e-6)
    summary = report.summary()
    assert summary["frames"]["evaluated"] == summary["frames"]["total"] == 6
    assert [f.name for f in report.sorted_frames()] == [s.stem for s in samples]
    for iou, got in zip(expected["per_class"].values(), summary["accuracy"]["per_class"].values(), strict=True):
        assert (got is None and iou is None) or got == pytest.approx(iou, abs=1e-6)
    assert all(f.inference_ms > 0 and f.coverage.sum() == pytest.approx(1.0, abs=1e-5) for f in report.frames)


def test_replay_and_eval_agree_with_bf16_convolutions(labelled) -> None:
    """The same dtype gives the same numbers in replay and eval: bf16 (the CPU graph's convolutions in bf16)."""
    bag, samples, _ = labelled
    bf16 = segmenter(dtype="bf16")
    expected = evaluate_samples(bf16, samples, info())
    with BagReader(bag) as reader:
        report = replay_offline(reader, bf16)
    assert report.confusion.matrix.tolist() == expected["confusion_matrix"]
    assert bf16.describe()["cpu_precision"] == "bf16 convolutions"


def test_ground_truth_matched_by_stamp_in_any_order(tmp_path: Path, seg: Segmenter) -> None:
    """Labels written before their image, one frame without a label, one label without an image."""
    from rosbags.rosbag2 import Writer
    from rosbags.typesys import Stores, get_typestore

    from ecmnet_core.image_messages import array_to_image

    ts = get_typestore(Stores.ROS2_KILTED)
    image_t, header_t, time_t = (ts.types[n] for n in ("sensor_msgs/msg/Image", "std_msgs/msg/Header",
                                                       "builtin_interfaces/msg/Time"))
    frames = make_frames(4)

    def header(stamp: int):
        return header_t(stamp=time_t(sec=stamp // 10**9, nanosec=stamp % 10**9), frame_id="cam")

    with Writer(tmp_path / "bag", version=9) as writer:
        img = writer.add_connection("/cam/image", "sensor_msgs/msg/Image", typestore=ts)
        gt = writer.add_connection("/cam/labels", "sensor_msgs/msg/Image", typestore=ts)
        for i, f in enumerate(frames):
            stamp = 10**18 + i * 10**8
            if i != 1:  # frame 1 has no label; its label slot goes to a stamp no image has
                writer.write(gt, stamp - 5, ts.serialize_cdr(array_to_image(f.label, "mono8", header(stamp), image_t),
                                                             "sensor_msgs/msg/Image"))
            else:
                writer.write(gt, stamp, ts.serialize_cdr(array_to_image(f.label, "mono8", header(stamp + 1), image_t),
                                                         "sensor_msgs/msg/Image"))
            # the image arrives 30 ms after its label (receive time), with the label's header stamp
            writer.write(img, stamp + 30_000_000, ts.serialize_cdr(array_to_image(f.image, "bgr8", header(stamp),
                                                                                  image_t), "sensor_msgs/msg/Image"))
    with BagReader(tmp_path / "bag") as reader:
        report = replay_offline(reader, seg, label_topic="/cam/labels")
    s = report.summary()["frames"]
    assert (s["total"], s["with_label"], s["evaluated"], s["unmatched_labels"]) == (4, 3, 3, 1)
    preds = segment_images(seg, [f.image for i, f in enumerate(frames) if i != 1])
    from ecmnet_core.metrics import ConfusionMatrix

    cm = ConfusionMatrix(K, 255)
    for pred, f in zip(preds, [f for i, f in enumerate(frames) if i != 1]):
        cm.update(pred, f.label)
    np.testing.assert_array_equal(report.confusion.matrix, cm.matrix)


def test_undecodable_image_is_skipped_and_counted(tmp_path: Path, seg: Segmenter) -> None:
    """One image whose payload does not match its header: skipped, counted, the other frames evaluated."""
    from rosbags.rosbag2 import Writer

    write_image_bag(make_frames(4), BagWriteConfig(out=tmp_path / "good", start_time=START))
    with BagReader(tmp_path / "good") as reader, Writer(tmp_path / "bad", version=9) as writer:
        conns = {c.topic: writer.add_connection(c.topic, c.msgtype, msgdef=c.msgdef.data, rihs01=c.digest)
                 for c in reader._reader.connections}
        for i, msg in enumerate(reader.messages()):
            if msg.topic == "/camera/image_raw" and i == 2:
                msg.msg.step = msg.msg.step + 3  # data length no longer step x height
                raw = reader.typestore.serialize_cdr(msg.msg, msg.msgtype)
            else:
                raw = msg.raw
            writer.write(conns[msg.topic], msg.t_ns, raw)
    with BagReader(tmp_path / "bad") as reader:
        report = replay_offline(reader, seg)
    s = report.summary()["frames"]
    assert (s["total"], s["answered"], s["evaluated"], s["skipped_undecodable"]) == (4, 3, 3, 1)
    assert list(s["skipped_reasons"]) == ["/camera/image_raw: undecodable Image (ImageConversionError)"]
    assert [f.status for f in report.sorted_frames()] == ["ok", "skipped", "ok", "ok"]


def test_reports_and_output_bag(labelled, seg: Segmenter, tmp_path: Path) -> None:
    bag, _, frames = labelled
    with BagReader(bag) as reader:
        report = replay_offline(reader, seg, output_bag=tmp_path / "out_bag", max_frames=5)
    paths = report.write(tmp_path / "report")
    assert sorted(p.name for p in paths) == ["coverage.png", "frames.csv", "latency.png", "per_class_iou.png",
                                             "report.json"]
    summary = json.loads((tmp_path / "report" / "report.json").read_text())
    assert summary["mode"] == "offline" and summary["frames"]["total"] == summary["frames"]["evaluated"] == 5
    assert summary["frames"]["unmatched_labels"] == 0  # the 6th label belongs to a frame past --max-frames
    assert summary["accuracy"]["miou"] == pytest.approx(report.confusion.miou())
    assert summary["timing"]["inference_ms"]["count"] == 5 and summary["segmenter"]["random_weights"] is True
    rows = list(csv.DictReader((tmp_path / "report" / "frames.csv").open()))
    assert [r["name"] for r in rows] == [f.name for f in frames[:5]]
    assert {f"iou_c{i}" for i in range(K)} | {f"cov_c{i}" for i in range(K)} <= set(rows[0])
    assert all(p.stat().st_size > 1000 for p in paths if p.suffix == ".png")
    # the output bag: every input message plus the predictions, same header as their image
    expected = segment_images(seg, [f.image for f in frames[:5]])
    with BagReader(tmp_path / "out_bag") as reader:
        assert {t: i.count for t, i in reader.topics.items()} == {"/camera/image_raw": 6, "/camera/labels": 6,
                                                                  "/segmenter/labels": 5}
        images = {m.stamp_ns: m.t_ns for m in reader.messages(["/camera/image_raw"])}
        preds = list(reader.messages(["/segmenter/labels"]))
    for pred, msg in zip(expected, preds):
        assert images[msg.stamp_ns] == msg.t_ns
        np.testing.assert_array_equal(decode_label_message(msg.msg, msg.msgtype), pred)


def test_replay_cli_offline(labelled, tmp_path: Path, capsys) -> None:
    bag, _, _ = labelled
    out = tmp_path / "cli_report"
    assert cli(["replay", "--offline", str(bag), "--model", "baseline", "--num-classes", str(K),
                "--input-size", "32", "48", "--out", str(out), "--no-plots", "--start-offset", "0.1"]) == 0
    text = capsys.readouterr().out
    assert "offline replay of" in text and "mIoU" in text
    summary = json.loads((out / "report.json").read_text())
    assert summary["frames"]["total"] == 4  # frames at 0 and 1/15 s are before the offset
    assert summary["bag"]["start_offset_s"] == 0.1 and not (out / "latency.png").exists()
    names = [r["name"] for r in csv.DictReader((out / "frames.csv").open())]
    assert names == ["f2", "f3", "f4", "f5"]


def test_replay_console_script(labelled, tmp_path: Path, capsys) -> None:
    """The ``replay`` console script runs the same command (ROS arguments are stripped)."""
    from ecmnet_ros.replay import main

    bag, _, _ = labelled
    assert main(["--offline", str(bag), "--model", "baseline", "--input-size", "0", "0", "--max-frames", "2",
                 "--ros-args", "-r", "__node:=x"]) == 0
    assert "offline replay of" in capsys.readouterr().out


def test_replay_cli_errors(labelled, tmp_path: Path) -> None:
    bag, _, _ = labelled
    with pytest.raises(SystemExit, match="bag .*nothing does not exist"):
        cli(["replay", "--offline", str(tmp_path / "nothing"), "--model", "baseline"])
    with pytest.raises(SystemExit, match="image topic '/x' does not exist; topics in the bag"):
        cli(["replay", "--offline", str(bag), "--model", "baseline", "--num-classes", str(K), "--image-topic", "/x"])
    with pytest.raises(SystemExit, match="labels for 4 classes .* the model predicts 11"):
        cli(["replay", "--offline", str(bag), "--model", "baseline", "--num-classes", "11"])


def test_bag_without_labels_reports_no_accuracy(tmp_path: Path, seg: Segmenter) -> None:
    frames = [BagFrame(f.image, None, f.name) for f in make_frames(2)]
    write_image_bag(frames, BagWriteConfig(out=tmp_path / "bag", start_time=START))
    with BagReader(tmp_path / "bag") as reader:
        report = replay_offline(reader, seg)
    s = report.summary()
    assert s["frames"]["evaluated"] == 0 and s["accuracy"]["miou"] is None
    assert "accuracy not measured" in report.format_text()
    with BagReader(tmp_path / "bag") as reader, pytest.raises(BagError, match="no image frames"):
        replay_offline(reader, seg, start_offset=10.0)


def test_min_confidence_replay_scores_the_kept_pixels_like_eval(labelled, tmp_path: Path) -> None:
    """``replay --min-confidence``: unknown pixels (255) leave the scores and are counted, as eval's kept-pixel
    figures count them."""
    bag, samples, _ = labelled
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masked = Segmenter(InferenceConfig(model="baseline", num_classes=K, input_size=(32, 48), warmup=0,
                                           min_confidence=0.4))
    expected = evaluate_samples(masked, samples, info())["confidence"]
    with BagReader(bag) as reader:
        report = replay_offline(reader, masked)
    summary = report.summary()
    assert 0.0 < summary["accuracy"]["unknown_share"] < 1.0
    assert summary["accuracy"]["unknown_share"] == pytest.approx(1.0 - expected["kept_share"], abs=1e-9)
    assert int(report.confusion.matrix.sum()) == expected["kept"]["pixels"]
    assert report.confusion.miou() == pytest.approx(expected["kept"]["miou"], abs=1e-6)
