"""The ``segmenter`` lifecycle node: images in, class-id label images, colour masks, overlays and coverage out.

The node is thin: message conversion (:mod:`ecmnet_core.image_messages`) around
:class:`ecmnet_core.inference.Segmenter`. Threads:

* executor threads run the image callbacks (they only validate the header and put the message in a per-camera
  newest-frame slot - a slow model never builds a backlog; replaced frames are counted as dropped), the
  parameter and lifecycle services and the 1 Hz ``/diagnostics`` timer;
* one worker thread (started on activate) takes the newest frame of every camera, decodes it, runs the model
  once for all cameras and publishes. Parameters, diagnostics and lifecycle requests therefore stay responsive
  during a long forward pass.

Lifecycle: configure loads the model and creates publishers, activate subscribes and starts the worker,
deactivate stops it and moves the model off the GPU, cleanup releases everything. ``main()`` configures and
activates the node itself unless ``autostart`` is false.
"""

from __future__ import annotations

import copy
import gc
import signal
import sys
import threading
import time
from typing import Any

import numpy as np
import rclpy
import torch
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy._rclpy_pybind11 import RCLError
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.exceptions import ParameterException
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.qos_overriding_options import QoSOverridingOptions
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Float32MultiArray, Header

from ecmnet_core.allocator import TrimOnResize, limit_arenas, malloc_trim
from ecmnet_core.image_messages import ImageConversionError, check_message
from ecmnet_core.inference import Segmenter
from ecmnet_core.inference.pipeline import confidence_image
from ecmnet_ros import diagnostics as diag
from ecmnet_ros.bridge import ImageCodec
from ecmnet_ros.messages import bgr_message, coverage_array, coverage_stamped, labels_message, scale_camera_info
from ecmnet_ros.painting import PointPainter, transform_source
from ecmnet_ros.params import (
    CLASS_NAMES,
    CONFIGURE,
    PARAMS,
    SPECS,
    LiveSettings,
    inference_config,
    validate,
)
from ecmnet_ros.runtime import (
    ModelThread,
    ShutdownRequested,
    Spinner,
    bounded_middleware_memory,
    declare_parameters,
    set_read_only_parameter,
    stamp_ns,
    startup_error,
    stop_on_signals,
)
from ecmnet_ros.stats import LatestSlot
from ecmnet_ros.stream import WARN_PERIOD_S, Stream, take_ready
from ecmnet_ros.topics import plan_streams

#: Camera drivers publish reliable or best effort; a best-effort, depth-1 subscriber matches both and never queues.
IMAGE_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.BEST_EFFORT,
                       durability=DurabilityPolicy.VOLATILE)
#: Results are reliable (REP-2003); a reliable publisher also serves best-effort subscribers.
RESULT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5, reliability=ReliabilityPolicy.RELIABLE,
                        durability=DurabilityPolicy.VOLATILE)
# (rclpy writes QoS overrides into the profile object it is given: overridden entities get a copy, or one node's
# override would become every later node's default in the process)
DIAGNOSTICS_PERIOD_S = 1.0
STOP_TIMEOUT_S = 30.0


class SegmenterNode(LifecycleNode):
    """ECMNet semantic segmentation as a ROS 2 lifecycle node (see the module docstring and config/segment.yaml)."""

    def __init__(self, node_name: str = "segmenter", **kwargs: Any) -> None:
        # set before Node.__init__: a failing constructor still ends in destroy_node()
        self.segmenter: Segmenter | None = None
        self.streams: list[Stream] = []
        self.painter: PointPainter | None = None
        self._configured = False
        self._active = False
        self._last_error = ""
        self._device_note = ""
        self._condition = threading.Condition()
        self._worker: threading.Thread | None = None
        #: set by ``main`` when a signal asks the process to stop (a configure it interrupts is not an error)
        self.shutdown_requested = threading.Event()
        self._trim = TrimOnResize()  # freed memory back to the OS when input sizes change
        self._model_thread = ModelThread(f"{node_name}-model")  # every configure on one thread (one OpenMP team)
        #: input decoding and output Images: cv_bridge where it converts correctly (ecmnet_ros.bridge)
        self.codec = ImageCodec()
        self._stopping = False
        super().__init__(node_name, **kwargs)
        declare_parameters(self, PARAMS, validate)  # start-up values checked like later ones
        self._live = LiveSettings.from_values(self.parameter_values())
        self.add_on_set_parameters_callback(self._validate_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)

        self._io_group = ReentrantCallbackGroup()  # image callbacks only touch the slots
        self._diagnostics_group = MutuallyExclusiveCallbackGroup()
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diagnostics_timer = self.create_timer(DIAGNOSTICS_PERIOD_S, self.publish_diagnostics,
                                                    callback_group=self._diagnostics_group)

    # ----------------------------------------------------------------------------------------- parameters
    def _validate_parameters(self, params: list[Parameter]) -> SetParametersResult:
        for p in params:
            spec = SPECS.get(p.name)
            if spec is None:
                continue  # qos_overrides.* and class_names: rclpy enforces read_only for those
            if spec.kind == CONFIGURE and self._configured:
                return SetParametersResult(successful=False, reason=(
                    f"parameter {p.name!r} is applied on lifecycle configure and the node is configured now: "
                    "deactivate and clean up the node, set it, then configure again"))
            reason = validate(p.name, p.value, self.segmenter.class_names if self.segmenter else None)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
        return SetParametersResult(successful=True)

    def _apply_parameters(self, params: list[Parameter]) -> None:
        # swap one immutable snapshot: the worker reads it once per frame, so a change applies to the next frame
        self._live = LiveSettings.from_values(self.parameter_values())

    @property
    def live_settings(self) -> LiveSettings:
        """The live parameters now (an immutable snapshot, swapped when a parameter changes)."""
        return self._live

    def parameter_values(self) -> dict[str, Any]:
        """Current value of every node parameter in :data:`ecmnet_ros.params.PARAMS` (None when unset)."""
        return {spec.name: self.get_parameter_or(spec.name).value for spec in PARAMS}

    # ------------------------------------------------------------------------------------------ lifecycle
    def bring_up(self) -> bool:
        """Configure and activate unless ``autostart`` is false; True when the node ends up active."""
        if not self.get_parameter("autostart").value:
            self.get_logger().info("autostart is false: waiting for a lifecycle manager to configure/activate")
            return False
        if self.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            return False
        return self.trigger_activate() == TransitionCallbackReturn.SUCCESS

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        log = self.get_logger()
        try:
            config = inference_config(self.parameter_values())
            topics = self.get_parameter_or("image_topics").value or []
            plans = plan_streams(list(topics), self.get_parameter("compressed").value, self.get_name())
            transforms = None
            if self.get_parameter("paint_points").value:
                if not self.get_parameter("use_camera_info").value:
                    raise ValueError("paint_points needs camera_info: set use_camera_info to true")
                transforms = transform_source(self, self.get_parameter_or("lidar_to_camera").value, len(plans))
            segmenter = self._model_thread.run(Segmenter, config)
        except Exception as exc:  # bad checkpoint, unavailable device, bad topics: say why, stay unconfigured
            if self.shutdown_requested.is_set():  # a signal interrupted the load or warm-up: not an error
                log.info("configure interrupted: shutting down")
                return TransitionCallbackReturn.FAILURE
            self._last_error = f"configure failed: {exc}"
            log.error(f"{self._last_error}; the node stays unconfigured: set the parameter (ros2 param set "
                      f"{self.get_fully_qualified_name()} NAME VALUE), then ros2 lifecycle set "
                      f"{self.get_fully_qualified_name()} configure")
            return TransitionCallbackReturn.FAILURE
        self.segmenter = segmenter
        self._last_error = ""
        requested = config.device.strip().lower()
        self._device_note = (f"{segmenter.device} (auto: CUDA not available, running on CPU)"
                             if requested == "auto" and segmenter.device.type == "cpu" else str(segmenter.device))
        facts = segmenter.describe()
        log.info(f"model {facts['model']} ({facts['checkpoint']}, sha256 {facts['checkpoint_hash']}), "
                 f"{facts['classes']} classes, network input {facts['input_size']}, device {self._device_note}, "
                 f"{facts['dtype']}, scan backend {facts['scan_backend']}")
        if segmenter.random_weights:
            log.warning(f"RANDOM WEIGHTS: no checkpoint, model {segmenter.model_name!r} is untrained - its labels "
                        "are meaningless (set the 'checkpoint' parameter for real output)")
        set_read_only_parameter(self, CLASS_NAMES, list(segmenter.class_names), "class names of the loaded model, "
                                "index = class id in ~/labels and ~/coverage (255 = unlabeled or unknown)")
        unknown = [c for c in self._live.coverage_classes if c not in segmenter.class_names]
        if unknown:
            log.warning(f"coverage_classes {unknown} are not classes of this model {segmenter.class_names}; "
                        "they are ignored")

        with_overrides = QoSOverridingOptions.with_default_policies()
        self.streams = []
        for plan in plans:
            stream = Stream(topics=plan, slot=LatestSlot(self._condition), name=self.resolve_topic_name(plan.image))
            for name, msg_type in (("labels", Image), ("confidence", Image), ("color", Image), ("overlay", Image),
                                   ("coverage", Float32MultiArray), ("coverage_stamped", DiagnosticArray),
                                   ("camera_info", CameraInfo)):
                stream.publishers[name] = self.create_lifecycle_publisher(
                    msg_type, plan.output(name), copy.copy(RESULT_QOS), qos_overriding_options=with_overrides)
            stream.labels_topic = stream.publishers["labels"].topic_name
            self.streams.append(stream)
        if transforms is not None:
            self.painter = PointPainter(self, len(self.streams), transforms, RESULT_QOS, WARN_PERIOD_S,
                                        self._io_group)
            log.info(f"painting points from {self.painter.topic} (transform from {transforms.describe})")
        self._configured = True
        return super().on_configure(state)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self.segmenter is None:  # cannot happen through the state machine; be explicit anyway
            return TransitionCallbackReturn.FAILURE
        self.segmenter.unpark()  # back from the CPU after a deactivate (no-op otherwise)
        with_overrides = QoSOverridingOptions.with_default_policies()
        for stream in self.streams:
            plan = stream.topics
            msg_type = CompressedImage if plan.compressed else Image
            stream.subscriptions.append(self.create_subscription(
                msg_type, plan.image, lambda msg, s=stream: self._on_image(s, msg), copy.copy(IMAGE_QOS),
                callback_group=self._io_group, qos_overriding_options=with_overrides))
            if self.get_parameter("use_camera_info").value:
                stream.subscriptions.append(self.create_subscription(
                    CameraInfo, plan.camera_info, lambda msg, s=stream: setattr(s, "camera_info", msg), IMAGE_QOS,
                    callback_group=self._io_group))
            stream.next_due = 0.0
        if self.painter is not None:
            self.painter.activate()
        self._start_worker()
        self._active, self._active_since = True, time.monotonic()
        inputs = ", ".join(s.name for s in self.streams)
        self.get_logger().info(f"active: segmenting {inputs}")
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_pipeline()
        self._park_model()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        return super().on_cleanup(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        return super().on_shutdown(state)

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.get_logger().error(f"lifecycle error in state {state.label}: releasing the model")
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def _stop_pipeline(self) -> None:
        """Stop the worker and unsubscribe; frames still in the slots are discarded."""
        self._active = False
        self._stop_worker()
        if self.painter is not None:
            self.painter.deactivate()
        for stream in self.streams:
            for sub in stream.subscriptions:
                self.destroy_subscription(sub)
            stream.subscriptions.clear()
            stream.slot.clear()

    def _park_model(self) -> None:
        """Free GPU memory while inactive: the weights wait on the CPU until the next activate."""
        if self.segmenter is not None and self.segmenter.device.type == "cuda":
            self.segmenter.park()
            torch.cuda.empty_cache()

    def _release(self) -> None:
        self._stop_pipeline()
        for stream in self.streams:
            for pub in stream.publishers.values():
                self.destroy_lifecycle_publisher(pub)
        self.streams = []
        if self.painter is not None:
            self.painter.destroy()
            self.painter = None
        if self.segmenter is not None:
            self.segmenter.release()
            self.segmenter = None
            gc.collect()  # the model's graphs hold reference cycles: free them now, then hand the pages back
            malloc_trim()
        self._configured = False

    def destroy_node(self) -> None:
        self._stop_worker()
        self._model_thread.close()
        if self.segmenter is not None:
            self.segmenter.release()
            self.segmenter = None
        super().destroy_node()

    # ------------------------------------------------------------------------------------------ input side
    def _on_image(self, stream: Stream, msg: Any) -> None:
        try:
            check_message(msg, self._live.max_image_pixels)
        except ImageConversionError as exc:
            self._bad_message(stream, exc.kind, str(exc))
            self._trim(((len(msg.data),),))  # huge rejected messages leave freed heap: give it back (<= 1/s)
            return
        stream.input_rate.tick()
        stream.slot.put(msg)

    def _bad_message(self, stream: Stream, kind: str, text: str) -> None:
        if stream.errors.add(kind, text):
            self.get_logger().warning(
                f"{stream.name}: bad message skipped ({kind}): {text} [{stream.errors.counts[kind]} so far; "
                f"further '{kind}' warnings for this topic throttled to one per {WARN_PERIOD_S:g} s]")

    # --------------------------------------------------------------------------------------------- worker
    def _start_worker(self) -> None:
        self._stopping = False
        self._worker = threading.Thread(target=self._run, name=f"{self.get_name()}-inference", daemon=True)
        self._worker.start()

    def _stop_worker(self) -> None:
        worker, self._worker = self._worker, None
        if worker is None:
            return
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        worker.join(STOP_TIMEOUT_S)
        if worker.is_alive():
            self.get_logger().error(f"inference thread did not stop within {STOP_TIMEOUT_S:g} s")

    def _run(self) -> None:
        while (batch := take_ready(self.streams, self._condition, lambda: self._stopping)) is not None:
            try:
                self._process(batch)
            except Exception as exc:  # never let the worker die silently
                for stream, _ in batch:
                    self._bad_message(stream, "inference", f"inference failed: {exc!r}")

    def _process(self, batch: list[tuple[Stream, Any]]) -> None:
        live = self._live
        period = 1.0 / live.max_rate_hz if live.max_rate_hz > 0 else 0.0
        streams, frames, images = [], [], []
        for stream, frame in batch:
            stream.next_due = time.monotonic() + period
            try:
                image = self.codec.decode(frame.msg, live.max_image_pixels)
            except ImageConversionError as exc:
                self._bad_message(stream, exc.kind, str(exc))
                continue
            streams.append(stream)
            frames.append(frame)
            images.append(image)
        if not images:
            return
        segmenter = self.segmenter
        if segmenter is None:
            return
        start = time.perf_counter()
        # the confidence comes from the same forward pass; computed only when someone uses it
        confidence = any(s.wants("confidence") for s in streams) or (
            self.painter is not None and live.paint_probability)
        results = segmenter.segment_batch(images, confidence=confidence, min_confidence=live.min_confidence)
        model_ms = (time.perf_counter() - start) * 1000.0 / len(images)
        for stream, frame, image, result in zip(streams, frames, images, results):
            stream.model.add(model_ms)
            self._publish(segmenter, stream, frame, image, result, live)
        self._trim(tuple(image.shape for image in images))

    def _publish(self, segmenter: Segmenter, stream: Stream, frame: Any, image: np.ndarray, result: Any,
                 live: LiveSettings) -> None:
        header = frame.msg.header
        labels = result.labels
        pubs = stream.publishers
        encode = self.codec.encode
        pubs["labels"].publish(labels_message(labels, header, encode))
        stream.unknown_share = result.unknown_share
        if result.confidence is not None and stream.wants("confidence"):
            pubs["confidence"].publish(labels_message(confidence_image(result.confidence), header, encode))
        if self.painter is not None:
            self.painter.add_labels(self.streams.index(stream), header, labels, result.confidence,
                                    stream.camera_info)
        if live.publish_color and stream.wants("color"):
            pubs["color"].publish(bgr_message(segmenter.colorize(labels), header, encode))
        if live.publish_overlay and stream.wants("overlay"):
            pubs["overlay"].publish(bgr_message(segmenter.overlay(image, labels, live.overlay_alpha), header, encode))
        if live.publish_coverage:
            pubs["coverage"].publish(coverage_array(result.coverage))
            pubs["coverage_stamped"].publish(coverage_stamped(
                header, result.coverage, segmenter.class_names, f"{self.get_fully_qualified_name()}: coverage "
                f"{stream.name}", live.coverage_classes,
                unknown_share=result.unknown_share if live.min_confidence > 0 else None))
        info = stream.camera_info
        if live.publish_camera_info and info is not None:
            pubs["camera_info"].publish(scale_camera_info(info, header, labels.shape[1], labels.shape[0]))
        done = time.monotonic()
        stream.latency.add((done - frame.received) * 1000.0)
        stream.inference.add(result.inference_ms)
        stamp = stamp_ns(header)
        if stamp:
            stream.stamp_age.add((self.get_clock().now().nanoseconds - stamp) / 1e6)
        stream.output_rate.tick(done)
        stream.processed += 1
        stream.last_output = done

    # ---------------------------------------------------------------------------------------- diagnostics
    @property
    def device_description(self) -> str:
        """The device the model runs on, with the reason when ``auto`` fell back to the CPU ("" before configure)."""
        return self._device_note

    def diagnostics(self) -> DiagnosticArray:
        """One status for the model/device and one per camera (also what ``publish_diagnostics`` sends)."""
        statuses = diag.node_statuses(self.get_fully_qualified_name(), self.segmenter, self.streams, self.painter,
                                      active=self._active, configured=self._configured,
                                      device_note=self._device_note, last_error=self._last_error,
                                      max_rate_hz=self._live.max_rate_hz)
        return DiagnosticArray(header=Header(stamp=self.get_clock().now().to_msg()), status=statuses)

    def publish_diagnostics(self) -> None:
        if self._active:
            diag.warn_if_no_input(self, self.streams, self._active_since, time.monotonic())
        try:
            self._diagnostics_pub.publish(self.diagnostics())
        except Exception as exc:  # e.g. a lifecycle transition swapping the streams mid-way: skip this tick
            self.get_logger().warning(f"diagnostics skipped: {exc!r}", throttle_duration_sec=10.0)


def main(args: list[str] | None = None) -> int:
    """``ros2 run ecmnet_ros segmenter`` / the ``ecmnet-segmenter`` console script.

    Exits 0 on SIGINT/SIGTERM after stopping in order: executor, inference worker (the frame in flight
    finishes), model, node, context. A signal during the start-up configure interrupts it.
    """
    # fewer malloc heaps for the many DDS/executor/OpenMP threads to fragment (python -m ecmnet_ros.bench_memory)
    limit_arenas(4)
    middleware_note = bounded_middleware_memory()  # before the middleware starts: it reads the environment once
    try:
        rclpy.init(args=args if args is not None else sys.argv, signal_handler_options=SignalHandlerOptions.NO)
        node = SegmenterNode()
    except (RCLError, ParameterException) as exc:  # a bad params file, value or type: one line, exit 2
        print(f"segmenter: {startup_error(exc)}", file=sys.stderr)
        rclpy.try_shutdown()
        return 2
    if middleware_note:
        node.get_logger().info(middleware_note)
    stop, interruptible = threading.Event(), threading.Event()
    code = 0
    with stop_on_signals(stop, interruptible) as received:
        node.shutdown_requested = stop
        spinner = Spinner(num_threads=4)
        spinner.add(node)
        try:
            spinner.start()  # services answer (lifecycle get, parameters) while configure warms the model up
            interruptible.set()
            try:
                if not stop.is_set():
                    node.bring_up()
            except ShutdownRequested:
                pass
            finally:
                interruptible.clear()
            while not stop.wait(0.2) and spinner.running and rclpy.ok():
                pass
        except Exception as exc:
            node.get_logger().fatal(f"segmenter stopped: {exc!r}")
            code = 1
        finally:
            if received:
                node.get_logger().info(f"{signal.Signals(received[0]).name}: shutting down")
            spinner.stop(destroy_nodes=True)
            rclpy.try_shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
