"""``ecmnet-core replay``: evaluate the segmenter on a rosbag2 recording.

* ``--offline BAG``: read the bag in time order, decode every image, run the same :class:`Segmenter` the ROS node
  runs, match ground-truth labels to predictions by header stamp and report accuracy (standard and framework
  mIoU, per-class and per-frame IoU), inference time per frame and class coverage over time. No ROS needed.
* ``--live BAG``: publish the bag's image topic into a running segmenter node (or one started in-process with
  ``--spawn-node``) and measure end-to-end latency, throughput, drops and accuracy
  (``ecmnet_ros.replay_live``, needs rclpy; found through the ``ecmnet_core.replay_live`` entry point, so
  this ROS-free library never imports the ROS package).

Both write ``report.json``, ``frames.csv`` and plots with ``--out DIR``, and a copy of the bag with the predicted
label topic added with ``--output-bag``.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ecmnet_core.bags.points_replay import PointsReplay
from ecmnet_core.bags.reader import BagError, BagMessage, BagReader, decode_image_message, decode_label_message
from ecmnet_core.bags.report import FrameRecord, LabelBagWriter, ReplayReport
from ecmnet_core.inference.pipeline import segment_images
from ecmnet_core.progress import Progress

if TYPE_CHECKING:
    from ecmnet_core.inference import Segmenter

log = logging.getLogger(__name__)

#: predictions / labels waiting for their partner are given up after this much bag time
MATCH_WINDOW_NS = 5_000_000_000


def frame_names(reader: BagReader, image_topic: str, start_ns: int | None) -> tuple[list[str], int]:
    """Frame names stored by ``make-bag`` for ``image_topic`` and the index of the first frame at ``start_ns``."""
    meta = reader.custom_data
    names = meta.get("frames") if meta.get("image_topic") == image_topic else None
    if not isinstance(names, list) or len(names) != reader.topics[image_topic].count:
        return [], 0
    first = 0
    if start_ns is not None:
        first = sum(1 for _ in reader.messages([image_topic], stop_ns=start_ns, deserialize=()))
    return [str(n) for n in names], first


def display_classes(reader: BagReader, segmenter: Segmenter) -> tuple[list[str], np.ndarray]:
    """Class names and RGB palette for reports; checks the bag's label space (``make-bag`` metadata) against the
    model's. A random-weight model has no names of its own, so the bag's are used."""
    bag_names = reader.custom_data.get("class_names")
    if not isinstance(bag_names, list) or not bag_names:
        return list(segmenter.class_names), segmenter.palette
    if len(bag_names) != segmenter.num_classes:
        raise BagError(f"bag {reader.path} has labels for {len(bag_names)} classes ({', '.join(bag_names)}) but "
                       f"the model predicts {segmenter.num_classes} ({', '.join(segmenter.class_names)})")
    if segmenter.random_weights:
        palette = reader.custom_data.get("palette")
        ok = isinstance(palette, list) and len(palette) == len(bag_names)
        return [str(n) for n in bag_names], np.asarray(palette, np.uint8) if ok else segmenter.palette
    if [str(n).lower() for n in bag_names] != [n.lower() for n in segmenter.class_names]:
        log.warning("bag %s class names %s differ from the model's %s; reporting the model's", reader.path,
                    bag_names, segmenter.class_names)
    return list(segmenter.class_names), segmenter.palette


def replay_offline(reader: BagReader, segmenter: Segmenter, *, image_topic: str | None = None,
                   label_topic: str | None = None, start_offset: float = 0.0, max_frames: int | None = None,
                   output_bag: str | Path | None = None, output_label_topic: str = "/segmenter/labels",
                   progress: bool = False, points_topic: str | None = None, lidar_to_camera: Any = None
                   ) -> ReplayReport:
    """Run ``segmenter`` on every image of the bag and score it against the bag's label topic.

    Args:
        reader: the open bag.
        segmenter: the model, built from the same :class:`InferenceConfig` as the ROS node. Predictions are made
            as ``ecmnet-core eval`` makes them (:func:`ecmnet_core.inference.pipeline.segment_images`), so the mIoU
            equals the evaluator's on the same frames.
        image_topic / label_topic: see :meth:`BagReader.resolve_topics` (None = auto, "" = no labels).
        start_offset: skip this many seconds of the bag's start.
        max_frames: stop after this many image frames.
        output_bag: write a copy of the bag with the predictions on ``output_label_topic``; progress: a bar on stderr.
        points_topic: PointCloud2 topic to paint with the predictions (None = the bag's ``make-bag --lidar``
            topic or its only cloud topic, "" = none); needs a CameraInfo topic and ``lidar_to_camera`` (16
            numbers, row-major; default: the bag's metadata).
    """
    image, label = reader.resolve_topics(image_topic, label_topic)
    if start_offset < 0:
        raise ValueError(f"--start-offset must be >= 0 seconds, got {start_offset}")
    start_ns = reader.start_ns + int(start_offset * 1e9) if start_offset else None
    names, first_index = frame_names(reader, image.name, start_ns)
    report = _offline_report(reader, segmenter, image, label, start_offset)
    writer = LabelBagWriter(Path(output_bag), reader, output_label_topic) if output_bag else None
    painter = report.points = _painter(reader, report, points_topic, lidar_to_camera)
    match = _Matcher(report, labelled=label is not None)
    seen_stamps: set[int] = set()
    index = first_index
    bar = Progress("replay", "frame", image.count if max_frames is None else min(image.count, max_frames), progress)
    topics = [image.name] + ([label.name] if label else []) + (painter.topics if painter else [])
    to_read = None if writer else topics  # the output bag copies every topic
    try:
        done = False
        for msg in reader.messages(to_read, start_ns=start_ns, deserialize=topics):
            if writer is not None:
                writer.write_raw(msg.topic, msg.t_ns, msg.raw)
            if done and not match.pending_pred and writer is None:
                break
            if msg.msg is None:
                continue
            if painter is not None and msg.topic in painter.topics:
                if not done:
                    painter.on_message(msg, reader)
                continue
            if label is not None and msg.topic == label.name:
                if done and msg.stamp_ns not in match.pending_pred:
                    continue  # past --max-frames: only labels of frames already predicted matter
                gt = _decode(reader, msg, label.msgtype, decode_label_message)
                if gt is not None:
                    if painter is not None:
                        painter.on_ground_truth(msg.stamp_ns, gt)
                    match.on_label(msg.stamp_ns, msg.t_ns, gt)
                continue
            if msg.topic != image.name:
                continue
            if max_frames is not None and index - first_index >= max_frames:
                if not done:
                    match.pending_gt.clear()  # labels read ahead belong to frames that will not be predicted
                done = True  # from here on messages are only copied (output bag) or matched to pending frames
                match.flush(msg.t_ns)
                continue
            name = names[index] if index < len(names) else ""
            picture = _decode(reader, msg, image.msgtype, decode_image_message)
            if picture is None:
                report.add_frame(FrameRecord(index, msg.stamp_ns, msg.t_ns, name, status="skipped"))
                index += 1
                continue
            if msg.stamp_ns in seen_stamps:
                log.warning("bag %s: image stamp %d repeats (frame %d); ground truth matches the first one",
                            reader.path, msg.stamp_ns, index)
            seen_stamps.add(msg.stamp_ns)
            record, pred = _predict(segmenter, picture, FrameRecord(index, msg.stamp_ns, msg.t_ns, name))
            if writer is not None:
                writer.write_labels(msg.t_ns, msg.stamp_ns, msg.frame_id, pred)
            if painter is not None:
                painter.on_prediction(msg.stamp_ns, msg.t_ns, pred)
            match.on_prediction(record, pred)
            index += 1
            bar.update(1)
            match.flush(msg.t_ns)
        match.flush(None)
        if painter is not None:
            painter.finish()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()
    if writer is not None:
        report.bag["output_bag"] = str(writer.close())
    report.count_skipped(reader.skipped)
    if not report.frames:
        raise BagError(f"bag {reader.path}: no image frames on {image.name} after the start offset")
    return report


def _predict(segmenter: Segmenter, picture: np.ndarray, record: FrameRecord) -> tuple[FrameRecord, np.ndarray]:
    """Segment one frame as ``ecmnet-core eval`` does; the record gets its inference time and coverage."""
    started = time.perf_counter()
    pred = segment_images(segmenter, [picture])[0]
    record.inference_ms = (time.perf_counter() - started) * 1000.0
    record.coverage = segmenter.coverage(pred)
    return record, pred


def _painter(reader: BagReader, report: ReplayReport, points_topic: str | None,
             lidar_to_camera: Any) -> PointsReplay | None:
    """The point painter of an offline replay, or None; a truncated bag and unpainted clouds go into the notes."""
    if reader.truncation:
        report.notes.append(f"bag truncated: {reader.truncation}")
    try:
        return PointsReplay.from_bag(reader, report.class_names, points_topic, lidar_to_camera)
    except BagError as exc:
        if points_topic or lidar_to_camera is not None:  # asked for: it is an error not to paint them
            raise
        # a cloud topic found by itself (e.g. a bag whose metadata.yaml with the transform is lost): evaluate the
        # images and say why the points were not painted
        report.notes.append(f"points not painted: {exc}")
        return None


def _offline_report(reader: BagReader, segmenter: Segmenter, image: Any, label: Any,
                    start_offset: float) -> ReplayReport:
    """An empty report for an offline replay of ``image`` (scored against ``label``, if any) in ``reader``."""
    class_names, palette = display_classes(reader, segmenter)
    return ReplayReport(
        "offline", class_names, palette=palette,
        bag={"path": str(reader.path), "storage": reader.storage, "image_topic": image.name,
             "image_type": image.msgtype, "label_topic": label.name if label else None,
             "messages": reader.message_count, "duration_s": reader.duration_ns / 1e9,
             "start_offset_s": start_offset, "dataset": reader.custom_data.get("dataset")},
        segmenter={**segmenter.describe(), "random_weights": bool(segmenter.random_weights)})


class _Matcher:
    """Pairs predictions with ground-truth labels by header stamp, whichever arrives first, within
    ``MATCH_WINDOW_NS`` of bag time; unmatched predictions are reported without a score, unmatched labels counted."""

    def __init__(self, report: ReplayReport, labelled: bool) -> None:
        self.report, self.labelled = report, labelled
        self.pending_pred: dict[int, tuple[FrameRecord, np.ndarray]] = {}
        self.pending_gt: dict[int, tuple[int, np.ndarray]] = {}

    def on_label(self, stamp_ns: int, t_ns: int, gt: np.ndarray) -> None:
        if stamp_ns in self.pending_pred:
            record, pred = self.pending_pred.pop(stamp_ns)
            self.report.add_frame(record, pred, gt)
        else:
            self.pending_gt[stamp_ns] = (t_ns, gt)

    def on_prediction(self, record: FrameRecord, pred: np.ndarray) -> None:
        if record.stamp_ns in self.pending_gt:
            self.report.add_frame(record, pred, self.pending_gt.pop(record.stamp_ns)[1])
        elif not self.labelled:
            self.report.add_frame(record, pred)
        else:
            self.pending_pred[record.stamp_ns] = (record, pred)

    def flush(self, now_ns: int | None) -> None:
        """Finalise predictions whose label never came, and forget labels whose image never came."""
        for stamp in [s for s, (r, _) in self.pending_pred.items()
                      if now_ns is None or now_ns - r.t_ns > MATCH_WINDOW_NS]:
            record, pred = self.pending_pred.pop(stamp)
            self.report.add_frame(record, pred)
        for stamp in [s for s, (t, _) in self.pending_gt.items() if now_ns is None or now_ns - t > MATCH_WINDOW_NS]:
            self.pending_gt.pop(stamp)
            self.report.unmatched_labels += 1


def _decode(reader: BagReader, msg: BagMessage, msgtype: str, fn: Any) -> np.ndarray | None:
    try:
        return fn(msg.msg, msgtype)
    except Exception as exc:  # one bad frame is skipped and counted, the replay goes on
        reader.skip(msg, f"undecodable {msgtype.rsplit('/', 1)[-1]} ({type(exc).__name__})", exc)
        return None


# ------------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ecmnet_core.inference.options import add_segmenter_arguments

    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--offline", metavar="BAG", help="evaluate offline: run the segmenter on every frame")
    mode.add_argument("--live", metavar="BAG", help="publish the bag into a running segmenter node and measure it")
    g = parser.add_argument_group("bag")
    g.add_argument("--image-topic", default=None, help="image topic (default: the bag's only image topic)")
    g.add_argument("--label-topic", default=None,
                   help="ground-truth mono8 label topic (default: /camera/labels if present; '' = none)")
    g.add_argument("--start-offset", type=float, default=0.0, help="skip this many seconds of the bag")
    g.add_argument("--max-frames", type=int, default=None, help="stop after this many image frames")
    g.add_argument("--points-topic", default=None,
                   help="offline: PointCloud2 topic to paint with the predictions (default: the bag's cloud topic "
                        "if it has one; '' = none); reports the share of painted points per class")
    g.add_argument("--lidar-to-camera", type=float, nargs=16, default=None, metavar="M",
                   help="offline: row-major 4x4 cloud frame -> camera optical frame (default: the bag's "
                        "make-bag --lidar metadata)")
    g = parser.add_argument_group("model (offline, and the node started by --spawn-node)")
    g.add_argument("--checkpoint", default=None, help="checkpoint file (default: the packaged CamVid model)")
    g.add_argument("--model", default=None, help="random-weight model variant instead of a checkpoint (timing)")
    g.add_argument("--num-classes", type=int, default=None, help="classes of --model (default: from the bag)")
    add_segmenter_arguments(g, native=False)
    g = parser.add_argument_group("output")
    g.add_argument("--out", metavar="REPORT_DIR", default=None, help="write report.json, frames.csv and plots here")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g.add_argument("--output-bag", default=None, help="write a copy of the bag with the predicted labels added")
    g.add_argument("--output-label-topic", default="/segmenter/labels", help="topic of the labels in --output-bag")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    g = parser.add_argument_group("live")
    g.add_argument("--rate", type=float, default=1.0, help="playback speed factor (default: 1.0 = recorded)")
    g.add_argument("--loop", action="store_true", help="play the bag again and again (until --duration / Ctrl-C)")
    g.add_argument("--duration", type=float, default=None, help="stop publishing after this many wall seconds")
    g.add_argument("--remap", action="append", default=[], metavar="FROM:=TO",
                   help="publish a bag topic under another name (repeatable), e.g. /camera/image_raw:=/image")
    g.add_argument("--clock", type=float, nargs="?", const=40.0, default=None, metavar="HZ",
                   help="publish /clock with bag time (default 40 Hz) for nodes with use_sim_time")
    g.add_argument("--qos", choices=("reliable", "best_effort"), default="reliable",
                   help="reliability of the image publisher (default: reliable, like ros2 bag play)")
    g.add_argument("--lockstep", action="store_true",
                   help="publish the next frame only after the result for the previous one (or --timeout)")
    g.add_argument("--timeout", type=float, default=5.0, help="lock-step wait per frame in seconds (default: 5)")
    g.add_argument("--namespace", default="", help="namespace of the segmenter node (outputs <ns>/segmenter/...)")
    g.add_argument("--node-name", default="segmenter", help="name of the segmenter node (default: segmenter)")
    g.add_argument("--result-topic", default=None, help="node label topic (default: <ns>/<node-name>/labels)")
    g.add_argument("--spawn-node", action="store_true", help="start the segmenter node in this process")
    g.add_argument("--wait", type=float, default=20.0, help="seconds to wait for the node to appear (default: 20)")
    g.add_argument("--drain", type=float, default=3.0,
                   help="seconds to wait for outstanding results after the last frame (default: 3)")


def build_segmenter(args: argparse.Namespace, bag_classes: int | None = None) -> Segmenter:
    from ecmnet_core.checkpoint import CheckpointError
    from ecmnet_core.inference import Segmenter
    from ecmnet_core.inference.options import inference_config_from_args

    num_classes = args.num_classes or bag_classes or 11
    config = inference_config_from_args(args, model=args.model, num_classes=num_classes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the random-weights warning is logged below instead
            segmenter = Segmenter(config)
    except CheckpointError as exc:
        raise SystemExit(f"replay: {exc}") from None
    if segmenter.random_weights:
        log.warning("RANDOM WEIGHTS: model %s has no checkpoint; accuracy figures are meaningless", args.model)
    segmenter.warm_up()  # graph capture and first-call costs before the first frame: not in the frame timings
    return segmenter


#: Entry-point group where the ROS side registers ``replay --live`` (``ecmnet_ros.replay_live:run_live_from_args``).
LIVE_ENTRY_POINT_GROUP = "ecmnet_core.replay_live"


def live_replay_command() -> Any:
    """The registered ``replay --live`` implementation; SystemExit with what to install when there is none."""
    from importlib.metadata import entry_points

    found = sorted(entry_points(group=LIVE_ENTRY_POINT_GROUP), key=lambda ep: ep.name)
    if not found:
        raise SystemExit(f"replay --live: no implementation registered under the {LIVE_ENTRY_POINT_GROUP!r} entry "
                         "point (install the package with its ROS side: pip install -e '.[ros]')")
    try:
        return found[0].load()
    except ImportError as exc:
        raise SystemExit(f"replay --live needs rclpy and the ROS message packages ({exc}); "
                         "install the 'ros' extra or source a ROS 2 setup") from None


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.max_frames is not None and args.max_frames < 1:
        raise SystemExit(f"replay: --max-frames must be >= 1, got {args.max_frames}")
    if args.live:
        return live_replay_command()(args)
    try:
        with BagReader(args.offline) as reader:
            bag_classes = reader.custom_data.get("class_names")
            segmenter = build_segmenter(args, len(bag_classes) if isinstance(bag_classes, list) else None)
            log.info("segmenter: %s", ", ".join(f"{k}={v}" for k, v in segmenter.describe().items()))
            report = replay_offline(reader, segmenter, image_topic=args.image_topic, label_topic=args.label_topic,
                                    start_offset=args.start_offset, max_frames=args.max_frames,
                                    output_bag=args.output_bag, output_label_topic=args.output_label_topic,
                                    progress=True, points_topic=args.points_topic,
                                    lidar_to_camera=args.lidar_to_camera)
    except (BagError, ValueError) as exc:
        raise SystemExit(f"replay: {exc}") from None
    report.publish(args.out, not args.no_plots, args.output_label_topic if args.output_bag else None, "predicted")
    return 0

