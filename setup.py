"""ament_python package ``ecmnet_ros``: installs both ``ecmnet_core`` and ``ecmnet_ros``."""

import sys
from glob import glob

from setuptools import find_namespace_packages, setup

PACKAGE = "ecmnet_ros"

# The node's executables keep their ROS names (`ros2 run ecmnet_ros segmenter`) where colcon installs them, in
# lib/ecmnet_ros (setup.cfg), and take prefixed names where pip puts them on PATH, so a pip user's `replay` or
# `segmenter` can't shadow another tool's. colcon's ament_python runs `setup.py develop|install`; pip builds a
# wheel (bdist_wheel, editable_wheel, dist_info). `ecmnet-core` is the same in both.
ROS_EXECUTABLES = {"segmenter": "ecmnet_ros.segmenter:main", "make_bag": "ecmnet_ros.make_bag:main",
                   "replay": "ecmnet_ros.replay:main"}
WHEEL_COMMANDS = {"bdist_wheel", "editable_wheel", "dist_info", "bdist_egg"}
if WHEEL_COMMANDS.isdisjoint(sys.argv[1:]) and {"develop", "install"} & set(sys.argv[1:]):
    NODE_SCRIPTS = [f"{name} = {target}" for name, target in ROS_EXECUTABLES.items()]
else:
    NODE_SCRIPTS = [f"ecmnet-{name.replace('_', '-')} = {target}" for name, target in ROS_EXECUTABLES.items()]

setup(
    name=PACKAGE,
    version="0.1.0",
    description="ECMNet CNN-Mamba semantic segmentation: library, training CLI and ROS 2 node",
    license="Apache-2.0",
    python_requires=">=3.10",
    # the data folders (configs, kernel sources, weights) are declared packages too, so setuptools installs them
    # without its "Package would be ignored" warnings
    packages=find_namespace_packages(include=["ecmnet_core", "ecmnet_core.*", "ecmnet_ros", "ecmnet_ros.*"],
                                     exclude=["*.__pycache__"]),
    package_data={"ecmnet_core.weights": ["*.pt"], "ecmnet_core.configs": ["*.yaml"],
                  "ecmnet_core.ops.csrc": ["*.cpp", "*.h"], "ecmnet_ros": ["*.xml"]},
    include_package_data=True,
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml") + glob("config/*.xml")),
    ],
    install_requires=[
        "torch>=2.4",
        "numpy",
        "opencv-python-headless",
        "pyyaml",
        "pillow",
        "tqdm",
        "matplotlib",
        "tensorboard",
        "rosbags>=0.10",
        "rosbags-image",
    ],
    extras_require={
        # triton on a CPU machine only for its interpreter, which the tests use to check the Triton scan kernel
        "test": ["pytest", "ruff", "ptflops", "fvcore", "onnx", "onnxruntime", "torchmetrics", "triton==3.6.0"],
        "triton": ["triton>=3.6"],
        "cost": ["ptflops", "fvcore"],
        "onnx": ["onnx", "onnxruntime"],
        "ros": [
            "ros-rclpy", "ros-rmw-fastrtps-cpp", "ros-sensor-msgs", "ros-std-msgs", "ros-diagnostic-msgs",
            "ros-lifecycle-msgs", "ros-rcl-lifecycle", "ros-rosgraph-msgs",
        ],
        "mamba": ["mamba-ssm"],
    },
    zip_safe=False,  # the CPU scan kernel is compiled from its packaged source on first use
    entry_points={
        "console_scripts": [
            "ecmnet-core = ecmnet_core.cli:main",
            *NODE_SCRIPTS,
        ],
        # the ROS side's `ecmnet-core replay --live`, found by the ROS-free core without importing ecmnet_ros
        "ecmnet_core.replay_live": ["ros = ecmnet_ros.replay_live:run_live_from_args"],
    },
)
