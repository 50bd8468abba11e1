"""The launch file and its configuration: declared arguments, parameter file, parameter overrides and remappings
(checked through stub ``launch`` modules, since the ROS launch packages are not on PyPI, and with the real ones
when installed); config/segment.yaml documents every node parameter with its default."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import yaml

from ecmnet_ros.launch_config import ARGUMENT_NAMES, LAUNCH_ARGUMENTS, default_params_file, node_kwargs
from ecmnet_ros.params import PARAMS

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_FILE = ROOT / "launch" / "segment.launch.py"
CONFIG = ROOT / "config" / "segment.yaml"


class Recorder:
    """Stands in for a launch class: keeps its constructor arguments."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


class FakeLaunchConfiguration(Recorder):
    def perform(self, context):
        return context[self.args[0]]


def stub_launch_modules(monkeypatch) -> None:
    """Minimal ``launch`` / ``launch_ros`` modules recording what the launch file builds."""
    classes = {"launch": {"LaunchDescription": type("LaunchDescription", (Recorder,), {})},
               "launch.actions": {"DeclareLaunchArgument": type("DeclareLaunchArgument", (Recorder,), {}),
                                  "OpaqueFunction": type("OpaqueFunction", (Recorder,), {})},
               "launch.substitutions": {"LaunchConfiguration": FakeLaunchConfiguration},
               "launch_ros": {}, "launch_ros.actions": {"Node": type("Node", (Recorder,), {})}}
    for name, members in classes.items():
        module = types.ModuleType(name)
        module.__dict__.update(members)
        monkeypatch.setitem(sys.modules, name, module)


def load_launch_file():
    spec = importlib.util.spec_from_file_location("segment_launch", LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_launch_file_declares_arguments_and_starts_the_node(monkeypatch):
    stub_launch_modules(monkeypatch)
    description = load_launch_file().generate_launch_description()
    entities = description.args[0]
    declared = {e.args[0]: e.kwargs for e in entities if type(e).__name__ == "DeclareLaunchArgument"}
    required = {"params_file", "namespace", "image_topic", "compressed", "checkpoint", "device", "use_sim_time",
                "log_level", "autostart"}
    assert required <= set(declared) and set(declared) == set(ARGUMENT_NAMES)
    assert declared["params_file"]["default_value"] == default_params_file()
    assert declared["params_file"]["default_value"].endswith("config/segment.yaml")
    assert all(d["description"] for d in declared.values())

    opaque = next(e for e in entities if type(e).__name__ == "OpaqueFunction")
    context = {a.name: a.default for a in LAUNCH_ARGUMENTS}
    context.update(params_file=str(CONFIG), namespace="front", image_topic="/front/camera/image_raw",
                   compressed="true", device="cpu", use_sim_time="true", log_level="debug")
    (node,) = opaque.kwargs["function"](context)
    kw = node.kwargs
    assert (kw["package"], kw["executable"], kw["name"], kw["namespace"]) == ("ecmnet_ros", "segmenter",
                                                                            "segmenter", "front")
    assert kw["parameters"] == [str(CONFIG), {"use_sim_time": True, "autostart": True, "compressed": True,
                                               "device": "cpu"}]
    assert kw["remappings"] == [("image", "/front/camera/image_raw"),
                                ("image/compressed", "/front/camera/image_raw/compressed"),
                                ("camera_info", "/front/camera/camera_info")]
    assert kw["arguments"] == ["--ros-args", "--log-level", "debug"]


def test_node_kwargs_defaults_and_errors():
    kw = node_kwargs({})
    assert kw["parameters"] == [default_params_file(), {"use_sim_time": False, "autostart": True,
                                                         "compressed": False}]
    assert kw["remappings"] == [] and kw["namespace"] == "" and kw["name"] == "segmenter"
    kw = node_kwargs({"image_topics": "/front/image_raw, /rear/image_raw", "checkpoint": "/m.pt",
                      "autostart": "false", "image_topic": "ignored"})
    assert kw["parameters"][1] == {"use_sim_time": False, "autostart": False, "compressed": False,
                                   "checkpoint": "/m.pt", "image_topics": ["/front/image_raw", "/rear/image_raw"]}
    assert kw["remappings"] == []
    assert node_kwargs({"image_topic": "cam/image", "camera_info_topic": "/info"})["remappings"][-1] == \
        ("camera_info", "/info")
    with pytest.raises(ValueError, match="log_level"):
        node_kwargs({"log_level": "loud"})
    with pytest.raises(ValueError, match="use_sim_time"):
        node_kwargs({"use_sim_time": "maybe"})
    with pytest.raises(ValueError, match="params_file"):
        node_kwargs({"params_file": "/nonexistent.yaml"})
    with pytest.raises(ValueError, match="unknown launch argument"):
        node_kwargs({"image": "x"})


def test_with_real_launch_packages():
    launch_ros = pytest.importorskip("launch_ros.actions", reason="ROS launch packages not installed")
    launch = pytest.importorskip("launch")
    if not hasattr(launch, "LaunchDescription"):  # the repository's launch/ folder can shadow the package
        pytest.skip("'launch' resolves to a plain folder, not the ROS launch package")
    DeclareLaunchArgument, OpaqueFunction = launch.actions.DeclareLaunchArgument, launch.actions.OpaqueFunction
    description = load_launch_file().generate_launch_description()
    assert isinstance(description, launch.LaunchDescription)
    names = {e.name for e in description.entities if isinstance(e, DeclareLaunchArgument)}
    assert names == set(ARGUMENT_NAMES)
    context = launch.LaunchContext()
    for entity in description.entities:
        if isinstance(entity, DeclareLaunchArgument):
            entity.visit(context)
    (node,) = next(e for e in description.entities if isinstance(e, OpaqueFunction)).visit(context)
    assert isinstance(node, launch_ros.Node)


def test_yaml_documents_every_parameter_with_its_default():
    data = yaml.safe_load(CONFIG.read_text())
    params = data["/**"]["ros__parameters"]
    text = CONFIG.read_text()
    for spec in PARAMS:
        if spec.default is None:  # unset by default: documented as a commented example
            assert f"# {spec.name}:" in text, f"{spec.name} not documented in {CONFIG.name}"
            assert spec.name not in params
        else:
            assert spec.name in params, f"{spec.name} missing from {CONFIG.name}"
            assert params[spec.name] == spec.default and type(params[spec.name]) is type(spec.default), spec.name
    assert set(params) <= {p.name for p in PARAMS}
    assert "class_names" in text and "qos_overrides" in text


def test_pip_install_puts_prefixed_executables_on_path() -> None:
    """A pip install (this venv) names the node's executables ecmnet-*, never the generic segmenter/replay/make_bag
    that colcon installs into lib/ecmnet_ros for ``ros2 run``."""
    from importlib.metadata import distribution

    scripts = {ep.name: ep.value for ep in distribution("ecmnet_ros").entry_points if ep.group == "console_scripts"}
    assert scripts == {"ecmnet-core": "ecmnet_core.cli:main", "ecmnet-segmenter": "ecmnet_ros.segmenter:main",
                       "ecmnet-make-bag": "ecmnet_ros.make_bag:main", "ecmnet-replay": "ecmnet_ros.replay:main"}
