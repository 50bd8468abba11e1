"""``make_bag`` console script (``ros2 run ecmnet_ros make_bag``): the same tool as ``ecmnet-core make-bag``.

Writes a rosbag2 (sqlite3 or mcap) with ``sensor_msgs/Image`` (or JPEG ``CompressedImage``) frames from a dataset
split or an image folder, plus mono8 ground-truth labels; see :mod:`ecmnet_core.bags.make_bag`.
"""

from __future__ import annotations

import argparse
import sys

from ecmnet_core.bags import make_bag as make_bag_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="make_bag", description=make_bag_command.__doc__.splitlines()[0])
    make_bag_command.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from rclpy.utilities import remove_ros_args

        argv = remove_ros_args(["make_bag", *argv])[1:]
    except ImportError:  # writing bags needs no ROS
        pass
    return int(make_bag_command.run(build_parser().parse_args(argv)) or 0)


if __name__ == "__main__":
    sys.exit(main())
