"""``replay`` console script (``ros2 run ecmnet_ros replay``): the same tool as ``ecmnet-core replay``.

``replay --live BAG [--spawn-node] [--lockstep] ...`` measures a segmenter node on a bag (see
:mod:`ecmnet_ros.replay_live`); ``replay --offline BAG`` evaluates without ROS. ROS arguments (``--ros-args ...``)
are removed before parsing.
"""

from __future__ import annotations

import argparse
import sys

from ecmnet_core.bags import replay as replay_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="replay", description=replay_command.__doc__.splitlines()[0])
    replay_command.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from rclpy.utilities import remove_ros_args

        argv = remove_ros_args(["replay", *argv])[1:]
    except ImportError:  # offline mode works without rclpy
        pass
    return int(replay_command.run(build_parser().parse_args(argv)) or 0)


if __name__ == "__main__":
    sys.exit(main())
