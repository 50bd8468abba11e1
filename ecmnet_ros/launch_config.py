"""Everything ``launch/segment.launch.py`` decides, as pure functions testable without the ROS ``launch`` packages.

The launch file declares :data:`LAUNCH_ARGUMENTS`, resolves them to strings and starts ``launch_ros.actions.Node``
with the keyword arguments of :func:`node_kwargs`. Remappings: ``image`` (and ``image/compressed``) -> the
``image_topic`` argument, ``camera_info`` -> ``camera_info_topic`` (default: next to the image topic).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PACKAGE = "ecmnet_ros"
EXECUTABLE = "segmenter"
PARAMS_FILE = "segment.yaml"
LOG_LEVELS = ("debug", "info", "warn", "error", "fatal")


@dataclass(frozen=True)
class LaunchArgument:
    name: str
    default: str
    description: str


#: ``params_file``'s default is filled in by :func:`default_params_file` (the installed share directory).
LAUNCH_ARGUMENTS: tuple[LaunchArgument, ...] = (
    LaunchArgument("params_file", "", "YAML parameter file (default: <share>/ecmnet_ros/config/segment.yaml)"),
    LaunchArgument("namespace", "", "namespace of the node (e.g. one per camera: front, rear)"),
    LaunchArgument("node_name", "segmenter", "name of the node"),
    LaunchArgument("image_topic", "image", "input image topic (remapped onto the node's 'image')"),
    LaunchArgument("camera_info_topic", "", "camera_info topic; empty = camera_info next to image_topic"),
    LaunchArgument("image_topics", "", "several cameras in one node: comma-separated image topics "
                                       "(overrides image_topic; outputs under each topic's namespace)"),
    LaunchArgument("compressed", "false", "subscribe to <image_topic>/compressed (sensor_msgs/CompressedImage)"),
    LaunchArgument("checkpoint", "", "checkpoint file; empty = the params file's value (packaged CamVid model)"),
    LaunchArgument("device", "", "auto, cpu, cuda or cuda:N; empty = the params file's value"),
    LaunchArgument("use_sim_time", "false", "use /clock (bag replay with --clock)"),
    LaunchArgument("log_level", "info", "logging level: " + ", ".join(LOG_LEVELS)),
    LaunchArgument("autostart", "true", "configure and activate on start-up (false: leave it to a lifecycle manager)"),
)
ARGUMENT_NAMES = tuple(a.name for a in LAUNCH_ARGUMENTS)


def default_params_file() -> str:
    """``share/ecmnet_ros/config/segment.yaml`` found through the ament index, else under this environment's
    prefix (``pip install`` puts data files there; AMENT_PREFIX_PATH may be unset), else the source tree's copy."""
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory

        try:
            return str(Path(get_package_share_directory(PACKAGE)) / "config" / PARAMS_FILE)
        except (PackageNotFoundError, OSError):  # not installed, or AMENT_PREFIX_PATH unset
            pass
    except ImportError:
        pass
    installed = Path(sys.prefix) / "share" / PACKAGE / "config" / PARAMS_FILE
    if installed.is_file():
        return str(installed)
    return str(Path(__file__).resolve().parents[1] / "config" / PARAMS_FILE)


def parse_bool(name: str, value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", ""):
        return False
    raise ValueError(f"launch argument {name}:={value!r} is not a boolean (true/false)")


def _sibling(topic: str, name: str) -> str:
    head, sep, _ = topic.rstrip("/").rpartition("/")
    return f"{head}{sep}{name}" if sep else name


def node_kwargs(values: dict[str, str]) -> dict[str, Any]:
    """Keyword arguments for ``launch_ros.actions.Node`` from resolved launch argument values (strings).

    Missing values take their defaults. Raises ValueError for a bad value, naming the argument.
    """
    unknown = sorted(set(values) - set(ARGUMENT_NAMES))
    if unknown:
        raise ValueError(f"unknown launch argument(s) {unknown}; known: {', '.join(ARGUMENT_NAMES)}")
    v = {a.name: a.default for a in LAUNCH_ARGUMENTS}
    v.update({k: str(val) for k, val in values.items()})
    params_file = v["params_file"] or default_params_file()
    if not Path(params_file).is_file():
        raise ValueError(f"launch argument params_file:={params_file!r}: file does not exist")
    level = v["log_level"].strip().lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"launch argument log_level:={v['log_level']!r} is not one of {', '.join(LOG_LEVELS)}")
    compressed = parse_bool("compressed", v["compressed"])

    overrides: dict[str, Any] = {"use_sim_time": parse_bool("use_sim_time", v["use_sim_time"]),
                                 "autostart": parse_bool("autostart", v["autostart"]), "compressed": compressed}
    if v["checkpoint"]:
        overrides["checkpoint"] = v["checkpoint"]
    if v["device"]:
        overrides["device"] = v["device"]
    remappings: list[tuple[str, str]] = []
    topics = [t.strip() for t in v["image_topics"].split(",") if t.strip()]
    if topics:
        overrides["image_topics"] = topics
    else:
        image = v["image_topic"].strip() or "image"
        if image != "image":
            remappings += [("image", image), ("image/compressed", f"{image}/compressed")]
        info = v["camera_info_topic"].strip() or _sibling(image, "camera_info")
        if info != "camera_info":
            remappings.append(("camera_info", info))
    return {
        "package": PACKAGE,
        "executable": EXECUTABLE,
        "name": v["node_name"],
        "namespace": v["namespace"],
        "parameters": [params_file, overrides],
        "remappings": remappings,
        "arguments": ["--ros-args", "--log-level", level],
        "output": "screen",
    }
