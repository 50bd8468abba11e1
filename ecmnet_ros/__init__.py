"""ecmnet_ros: the ROS 2 side of ecmnet (rclpy, no ROS build needed).

* :mod:`ecmnet_ros.segmenter` - the ``segmenter`` lifecycle node (``ros2 run ecmnet_ros segmenter``;
  ``ecmnet-segmenter`` on a pip install's PATH).
* Image / CompressedImage <-> numpy lives in :mod:`ecmnet_core.image_messages` (no rclpy needed: it works on rclpy
  and rosbags messages and plain objects alike), shared with offline bag replay.
* :mod:`ecmnet_ros.launch_config` - what ``launch/segment.launch.py`` builds, as pure functions.
* :mod:`ecmnet_ros.demo` / :mod:`ecmnet_ros.bench` - ``python -m ecmnet_ros.demo`` and ``python -m ecmnet_ros.bench``.
* :mod:`ecmnet_ros.runtime` - in-process context, executor thread and waiting helpers (demo, bench, tests, replay).
"""
