"""Running nodes in-process (demo, benchmark, bag replay, tests): context, executor thread, waiting helpers.

The shutdown order matters: executor, spin thread, nodes, context (shutting the context down under a live spin
thread aborts the process with "terminate called without an active exception").
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import rclpy
from builtin_interfaces.msg import Time
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.context import Context
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from std_msgs.msg import Header

from ecmnet_ros.params import DOUBLE, INTEGER, STARTUP, ParamSpec

#: Fast DDS profile of the node: history memory allocated per sample and freed with it (see the file's comment).
FASTDDS_PROFILE = Path(__file__).with_name("fastdds_profile.xml")
FASTRTPS_IMPLEMENTATIONS = ("rmw_fastrtps_cpp", "rmw_fastrtps_dynamic_cpp")


def bounded_middleware_memory(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Before ``rclpy.init``: give Fast DDS :data:`FASTDDS_PROFILE` (with ``RMW_FASTRTPS_USE_QOS_FROM_XML=1``, the
    setting that lets a profile's memory policy through) unless the user configured Fast DDS already, or another
    middleware is chosen. Returns a line for the log, None when nothing applies."""
    if environ.get("RMW_IMPLEMENTATION", FASTRTPS_IMPLEMENTATIONS[0]) not in FASTRTPS_IMPLEMENTATIONS:
        return None
    for var in ("FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE", "RMW_FASTRTPS_USE_QOS_FROM_XML"):
        if environ.get(var):
            return f"Fast DDS configured by ${var}={environ[var]}: the node's bounded-memory profile is not applied"
    environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(FASTDDS_PROFILE)
    environ["RMW_FASTRTPS_USE_QOS_FROM_XML"] = "1"
    return f"Fast DDS history memory freed with each sample ({FASTDDS_PROFILE.name})"


def isolate_discovery(domain_id: int | None = None) -> int:
    """Keep DDS discovery on this machine and pick a domain id; returns the id in use.

    Call before the first context is initialised. ``domain_id`` is used when given; otherwise an existing
    ``ROS_DOMAIN_ID`` is kept, else one is derived from the pid (1..101). An existing
    ``ROS_AUTOMATIC_DISCOVERY_RANGE`` is kept too (default here: LOCALHOST).
    """
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    if domain_id is not None:
        os.environ["ROS_DOMAIN_ID"] = str(domain_id)
    else:
        os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 101))
    return int(os.environ["ROS_DOMAIN_ID"])


@contextmanager
def ros_context(args: list[str] | None = None) -> Iterator[Context]:
    """A fresh rclpy context, shut down on exit (independent of the global default context)."""
    context = Context()
    rclpy.init(args=args, context=context)
    try:
        yield context
    finally:
        context.try_shutdown()


class Spinner:
    """A ``MultiThreadedExecutor`` spinning in a background thread; ``stop()`` shuts everything down in order."""

    def __init__(self, context: Context | None = None, num_threads: int = 4) -> None:
        self.context = context
        self.executor = MultiThreadedExecutor(num_threads=num_threads, context=context)
        self.nodes: list[Node] = []
        self._thread: threading.Thread | None = None

    def add(self, node: Node) -> Node:
        self.executor.add_node(node)
        self.nodes.append(node)
        return node

    def start(self) -> Spinner:
        self._thread = threading.Thread(target=self._spin, name="ros-spin", daemon=True)
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        """True while the spin thread is alive (False before start and once the executor has ended)."""
        return self._thread is not None and self._thread.is_alive()

    def _spin(self) -> None:
        try:
            self.executor.spin()
        except ExternalShutdownException:
            pass

    def stop(self, destroy_nodes: bool = True) -> None:
        self.executor.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
            self._thread = None
        if destroy_nodes:
            for node in reversed(self.nodes):
                node.destroy_node()
            self.nodes.clear()

    def __enter__(self) -> Spinner:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class ModelThread:
    """One long-lived thread for the work that builds a model (configure's load and warm-up).

    The executor runs a lifecycle request on whichever of its threads is free, and the first PyTorch parallel region
    a thread starts gives it an OpenMP team of its own that lives as long as the thread: configures spread over the
    executor's threads would add a team per thread (the node's thread count grew by one per cleanup -> configure
    cycle until every executor thread had one). Here every configure uses the same thread, so the same team.
    """

    def __init__(self, name: str) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the model thread; its result, or its exception raised here."""
        return self._pool.submit(fn, *args).result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.005) -> bool:
    """Poll ``predicate`` until it is truthy or ``timeout`` seconds pass; returns the final truthiness."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return bool(predicate())
        time.sleep(interval)


class TopicCollector:
    """Subscribes ``node`` to ``topic`` and keeps every message received (thread-safe), for tests and tools."""

    def __init__(self, node: Node, msg_type: Any, topic: str, qos: Any = 10) -> None:
        self.messages: list[Any] = []
        self.times: list[float] = []
        self._condition = threading.Condition()
        self.subscription = node.create_subscription(msg_type, topic, self._on_message, qos)

    def _on_message(self, msg: Any) -> None:
        with self._condition:
            self.messages.append(msg)
            self.times.append(time.monotonic())
            self._condition.notify_all()

    def wait(self, count: int = 1, timeout: float = 10.0) -> bool:
        """Block until at least ``count`` messages arrived in total; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._condition:
            while len(self.messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._condition.wait(left)
        return True

    def clear(self) -> None:
        with self._condition:
            self.messages.clear()
            self.times.clear()

    def __len__(self) -> int:
        return len(self.messages)


def connected(*endpoints: Any) -> bool:
    """True when every publisher sees a subscriber and every subscription sees a publisher.

    Checking both sides matters for best-effort topics: a publisher may already see the subscription while the
    subscriber has not matched the publisher yet, and a message sent then is lost.
    """
    for endpoint in endpoints:
        count = endpoint.get_subscription_count() if hasattr(endpoint, "get_subscription_count") \
            else endpoint.get_publisher_count()
        if count == 0:
            return False
    return True


def make_header(stamp_ns: int, frame_id: str = "camera") -> Header:
    """A header with the given stamp (nanoseconds) and frame id."""
    return Header(stamp=Time(sec=stamp_ns // 1_000_000_000, nanosec=stamp_ns % 1_000_000_000), frame_id=frame_id)


def stamp_ns(header: Any) -> int:
    """Header stamp in nanoseconds (works on rclpy and rosbags headers)."""
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


class ShutdownRequested(Exception):
    """A SIGINT/SIGTERM raised into a configure that runs on the main thread (checkpoint load, trace, warm-up),
    so that a signal during a slow start-up ends the process at once instead of after the warm-up."""


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event, interruptible: threading.Event,
                    signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[list[int]]:
    """Turn SIGINT/SIGTERM into ``stop.set()`` while inside (and into :class:`ShutdownRequested` while
    ``interruptible`` is set); the previous handlers come back on exit. Yields the signals received.

    rclpy's own handler shuts the context down from inside the signal and Python's raises KeyboardInterrupt
    wherever the main thread happens to be (``executor.shutdown()``, a publisher): both tear the node down
    half-way. A flag lets ``main`` stop in order instead, and a second signal (a terminal's Ctrl-C reaches
    ``ros2 launch`` and the node, then launch sends its own) changes nothing.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # signal.signal only works there
        yield received
        return

    def handler(signum: int, frame: Any) -> None:
        received.append(signum)
        stop.set()
        if interruptible.is_set():
            interruptible.clear()
            raise ShutdownRequested(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def parameter_descriptor(spec: ParamSpec) -> ParameterDescriptor:
    """The rclpy descriptor of a :class:`ecmnet_ros.params.ParamSpec`: type, description, range, read-only."""
    desc = ParameterDescriptor(name=spec.name, type=spec.type, description=spec.description,
                               additional_constraints=spec.constraints, read_only=spec.kind == STARTUP)
    if spec.range is not None and spec.type == INTEGER:
        desc.integer_range = [IntegerRange(from_value=int(spec.range[0]), to_value=int(spec.range[1]), step=0)]
    elif spec.range is not None and spec.type == DOUBLE:
        desc.floating_point_range = [FloatingPointRange(from_value=float(spec.range[0]),
                                                        to_value=float(spec.range[1]), step=0.0)]
    return desc


def set_read_only_parameter(node: Node, name: str, value: list[str], description: str) -> None:
    """Declare (or update) a string-array parameter that users can read but not set, e.g. ``class_names``."""
    from rclpy.parameter import Parameter

    desc = ParameterDescriptor(name=name, type=Parameter.Type.STRING_ARRAY.value, read_only=True,
                               description=description)
    if not node.has_parameter(name):
        node.declare_parameter(name, value, desc, ignore_override=True)
    elif list(node.get_parameter(name).value) != value:
        # read-only for users; a reconfigure with another model updates it (rclpy skips the read-only check
        # when descriptors are passed, and still publishes the parameter event)
        node._set_parameters_atomically_common([Parameter(name, value=value)], {name: desc})


#: Parameters every rclpy node has; not to be reported as unknown.
ROS_NODE_PARAMETERS = ("use_sim_time", "start_type_description_service")


def declare_parameters(node: Node, specs: Any, validate: Callable[[str, Any], str | None]) -> None:
    """Declare ``specs`` (:class:`ecmnet_ros.params.ParamSpec`) on ``node`` and check their start-up values with
    ``validate`` as a later ``ros2 param set`` would be checked (rclpy applies only the descriptor's type and range
    to start-up values): :class:`InvalidParameterValueException` names the first bad one. Start-up values for
    parameters the node does not have (a misspelt key in a params file) are warned about, with the closest name."""
    import difflib

    from rclpy.exceptions import InvalidParameterValueException
    from rclpy.parameter import Parameter

    names = [spec.name for spec in specs]
    for spec in specs:
        value = spec.default if spec.default is not None else Parameter.Type(spec.type)
        node.declare_parameter(spec.name, value, parameter_descriptor(spec))
    for name in names:
        value = node.get_parameter_or(name).value
        reason = validate(name, value)
        if reason:
            raise InvalidParameterValueException(name, value, reason)
    for name in sorted(getattr(node, "_parameter_overrides", {})):
        if name in names or name in ROS_NODE_PARAMETERS or name.startswith("qos_overrides."):
            continue
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        node.get_logger().warning(f"parameter {name!r} is not a parameter of this node and is ignored{hint}")


def startup_error(exc: BaseException) -> str:
    """One line for a start-up failure that names the parameter, the value and what is allowed; or what is wrong
    with a params file (rcl's message without its C source locations)."""
    import re

    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    m = re.match(r"Invalid parameter value \((.*)\) for parameter\. Reason: (.*): (\S+)$", text)
    if m:
        value, reason, name = m.groups()
        rng = re.search(r"out of range\.? Min: (.*), Max: (.*), value: ", reason)
        if rng:
            return f"parameter {name!r}: {value} is out of range [{rng.group(1)}, {rng.group(2)}]"
        return reason if reason.startswith(f"parameter {name!r}") else f"parameter {name!r}: {value}: {reason}"
    m = re.match(r"Trying to set parameter '(.*)' to '(.*)' of type '(.*)', expecting type '(.*)'", text)
    if m:
        name, value, got, expected = m.groups()
        hint = f" (write {value}.0)" if got == "INTEGER" and expected == "DOUBLE" else ""
        return f"parameter {name!r}: {value!r} is {got.lower()}, expected {expected.lower()}{hint}"
    return re.sub(r",? at /[^,]*\.c:\d+", "", text).replace("failed to initialize rcl: ", "")
