"""Start the ECMNet ``segmenter`` node: ``ros2 launch ecmnet_ros segment.launch.py image_topic:=/camera/image_raw``.

Arguments (``ros2 launch ecmnet_ros segment.launch.py --show-args``): params_file, namespace, node_name,
image_topic, camera_info_topic, image_topics, compressed, checkpoint, device, use_sim_time, log_level, autostart.
What they turn into (parameters, remappings) is decided by :func:`ecmnet_ros.launch_config.node_kwargs`, which is
unit-tested without the launch packages.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from ecmnet_ros.launch_config import LAUNCH_ARGUMENTS, default_params_file, node_kwargs


def _start_node(context, *args, **kwargs):
    values = {arg.name: LaunchConfiguration(arg.name).perform(context) for arg in LAUNCH_ARGUMENTS}
    return [Node(**node_kwargs(values))]


def generate_launch_description() -> LaunchDescription:
    declared = [
        DeclareLaunchArgument(arg.name, default_value=default_params_file() if arg.name == "params_file"
                              else arg.default, description=arg.description)
        for arg in LAUNCH_ARGUMENTS
    ]
    return LaunchDescription([*declared, OpaqueFunction(function=_start_node)])
