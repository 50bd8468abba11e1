"""rosbag2 tooling without a ROS install: write image bags, read them, replay them through the segmenter.

* :mod:`~ecmnet_core.bags.make_bag` — ``ecmnet-core make-bag``: dataset split / image folder -> bag.
* :mod:`~ecmnet_core.bags.reader` — :class:`BagReader`, :class:`BagError`, image / label decoding.
* :mod:`~ecmnet_core.bags.replay` — ``ecmnet-core replay``: offline evaluation (and the live mode's CLI).
* :mod:`~ecmnet_core.bags.report` — :class:`ReplayReport`: figures, ``report.json``, ``frames.csv``, plots.
"""

from ecmnet_core.bags.make_bag import BagFrame, BagSummary, BagWriteConfig, write_image_bag
from ecmnet_core.bags.reader import BagError, BagMessage, BagReader, TopicInfo

__all__ = ["BagError", "BagFrame", "BagMessage", "BagReader", "BagSummary", "BagWriteConfig", "TopicInfo",
           "write_image_bag"]
