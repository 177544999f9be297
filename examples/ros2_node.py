"""A ROS 2 node that certifies a camera topic: ``sensor_msgs/msg/Image`` in,
``rrise_msgs/msg/CertifiedPrediction`` out, one message per image, stamped with the image's own
header (its capture time and camera frame).

Needs a ROS 2 install (rclpy, sensor_msgs), the message package of this repository built in your
workspace, and the runtime::

    cp -r ros2/rrise_msgs ~/ros2_ws/src/ && (cd ~/ros2_ws && colcon build --packages-select rrise_msgs)
    source ~/ros2_ws/install/setup.bash
    pip install 'rrise[runtime]'
    python3 examples/ros2_node.py --ros-args -p bundle:=runs/demo/bundle -r image:=/camera/image_raw
    ros2 topic echo /certified_prediction

Parameters: ``bundle`` (the bundle folder), ``backend`` (auto, onnxruntime or tensorrt),
``precision`` (a variant of the bundle, e.g. int8; default as ``rrise run``). Images come with the
sensor-data QoS (best effort, newest kept): a slower model skips frames instead of queueing them.
Written against rclpy's documented API; the test suite does not run it (rclpy is not on PyPI).
"""

from __future__ import annotations

import rclpy
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from rrise_msgs.msg import CertifiedPrediction
from sensor_msgs.msg import Image

from rrise.runtime import Runtime
from rrise.runtime.imagecodec import raw_to_frame
from rrise.runtime.ros2_msgs import prediction_fields


class CertifyingNode(Node):
    """Subscribes to ``image``, publishes ``certified_prediction`` (remap both as usual)."""

    def __init__(self) -> None:
        super().__init__("rrise_certifier")
        bundle = self.declare_parameter("bundle", "").value
        backend = self.declare_parameter("backend", "auto").value
        precision = self.declare_parameter("precision", "").value or None
        if not bundle:
            raise SystemExit("set the bundle parameter: --ros-args -p bundle:=PATH")
        self.runtime = Runtime(bundle, backend=backend, precision=precision, source_name="image")
        self.get_logger().info(f"certifying with {self.runtime!r}")
        self.publisher = self.create_publisher(CertifiedPrediction, "certified_prediction", 10)
        self.subscription = self.create_subscription(Image, "image", self.on_image, qos_profile_sensor_data)
        self.frames = 0

    def on_image(self, msg: Image) -> None:
        stamp_ns = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        try:
            frame = raw_to_frame(msg.encoding, msg.height, msg.width, msg.step, bytes(msg.data))
        except ValueError as exc:  # an encoding the model cannot take: an error record, not a crash
            self.get_logger().warning(str(exc), throttle_duration_sec=5.0)
            frame = None
        record = self.runtime.certify(frame, stamp_ns=stamp_ns, frame_index=self.frames)
        self.frames += 1
        out = CertifiedPrediction(header=msg.header, **prediction_fields(record))  # the image's stamp
        self.publisher.publish(out)
        if record["alarm"]:
            self.get_logger().warning(f"distribution shift: {record['alarm']}", throttle_duration_sec=5.0)


def main(args: list[str] | None = None) -> None:
    rclpy.init(args=args)
    node = CertifyingNode()
    try:
        rclpy.spin(node)
    except KeyboardInterrupt:
        pass
    finally:
        node.runtime.close()
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
