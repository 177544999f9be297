"""How a run goes, declared once: :class:`RunOptions` (backend, variant, pinning) with one nested
group per concern: :class:`StreamOptions` (reading the source, batching, status records),
:class:`OutputOptions` (where records go), :class:`WatchOptions` (the premise checks: the shift
alarm and the per-frame out-of-distribution flag) and :class:`~rrise.runtime.adaptive.McOptions`
(adaptive certification: base-model draws where the surrogate's radius falls short).

The same fields are ``rrise run``'s flags, a ``--config FILE.yaml``'s keys and ``key=value``
overrides (:mod:`rrise.options`), and what :func:`rrise.runtime.run_stream`,
:class:`~rrise.runtime.stream.Stream` and :func:`~rrise.runtime.sinks.open_sinks` take. Each value
is checked here, with one line naming the flag.

>>> from rrise.options import make_options
>>> options = make_options(RunOptions, batch=4, jsonl="-", monitor_window=100)
>>> options.stream.batch, options.outputs.jsonl, options.watch.monitor_window
(4, '-', 100)
>>> try:
...     StreamOptions(batch=0)
... except ValueError as exc:
...     print(exc)
--batch must be >= 1, got 0

Importing this module loads no OpenCV, ZeroMQ or inference library.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from rrise.manifest_schema import PRECISIONS
from rrise.records import DEFAULT_TOPIC

from .adaptive import McOptions
from .backends import BACKENDS
from .recording import RECORD_FORMATS

__all__ = [
    "DROP_POLICIES",
    "FOREVER",
    "FOXGLOVE_DEFAULT",
    "BackendName",
    "DropPolicy",
    "OutputOptions",
    "Precision",
    "RecordFormat",
    "RunOptions",
    "StreamOptions",
    "WatchOptions",
    "parse_retry",
]

DROP_POLICIES = ("auto", "latest", "block")  # implemented by rrise.runtime.capture
FOREVER = "forever"  # --retry forever
FOXGLOVE_DEFAULT = "127.0.0.1:8765"  # where --foxglove serves when given no HOST:PORT

BackendName = Enum("BackendName", {n: n for n in BACKENDS}, type=str, module=__name__)
DropPolicy = Enum("DropPolicy", {n: n for n in DROP_POLICIES}, type=str, module=__name__)
RecordFormat = Enum("RecordFormat", {n: n for n in RECORD_FORMATS}, type=str, module=__name__)
Precision = Enum("Precision", {n: n for n in PRECISIONS}, type=str, module=__name__)


def parse_retry(value: int | str | None) -> int | None:
    """``--retry``'s value as the number of retries after the first failed open (None: forever);
    ValueError otherwise.

    >>> parse_retry("3"), parse_retry("forever")
    (3, None)
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == FOREVER):
        return None
    bad = f"--retry must be a count >= 0 or 'forever', got {value!r}"
    if isinstance(value, bool):
        raise ValueError(bad)
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(bad) from None
    if n < 0 or (isinstance(value, float) and value != n):
        raise ValueError(bad)
    return n


def _as_enum(options: object, name: str, kind: type[Enum], flag: str) -> None:
    """Set the field ``name`` of a frozen ``options`` to its ``kind`` member (given as its value)."""
    value = getattr(options, name)
    if value is None or isinstance(value, kind):
        return
    try:
        object.__setattr__(options, name, kind(value))
    except ValueError:
        choices = ", ".join(m.value for m in kind)
        raise ValueError(f"{flag} must be one of {choices}, got {value!r}") from None


def _at_least(flag: str, value: float | None, low: float) -> None:
    if value is not None and value < low:
        raise ValueError(f"{flag} must be >= {low:g}, got {value:g}")


@dataclass(frozen=True, kw_only=True)
class StreamOptions:
    """Reading the source: which frames, how many at once, what a slow model drops, and how often
    a status record sums the stream up.

    Parameters
    ----------
    max_frames, batch, drop_policy, queue_size, threaded, status_interval, realtime, loop, retry:
        As ``rrise run``'s flags of the same names (each field's ``help``).

    Raises
    ------
    ValueError
        A value out of range, naming its flag.

    >>> StreamOptions(batch=8, drop_policy="latest").batch
    8
    >>> StreamOptions(retry="forever").retries is None
    True
    """

    max_frames: int | None = field(default=None, metadata={"help": "Stop after this many frames."})
    batch: int = field(
        default=1, metadata={"help": "Certify up to this many queued frames per backend call."}
    )
    drop_policy: DropPolicy = field(
        default=DropPolicy.auto,
        metadata={
            "help": "latest: keep the newest frames, count drops (live default); block: every frame "
            "in order (file default); auto: by source."
        },
    )
    queue_size: int | None = field(
        default=None, metadata={"help": "Frames the capture queue holds (default by policy)."}
    )
    threaded: bool | None = field(
        default=None,
        metadata={
            "help": "Capture in its own thread (default: for live sources and --drop-policy latest, "
            "which needs it); --no-threaded reads files in the certifying thread."
        },
    )
    status_interval: float = field(
        default=1.0, metadata={"help": "Seconds between status records on TOPIC.status (0: none)."}
    )
    realtime: bool = field(
        default=False,
        metadata={
            "help": "Replay a video file or a recording at its recorded pace, like the camera it came "
            "from (a model that falls behind drops frames); default: flat out, every frame."
        },
    )
    loop: bool = field(
        default=False, metadata={"help": "Replay a video file or a recording over and over (soak tests)."}
    )
    retry: str = field(
        default="0",
        metadata={
            "help": "Retry a source that is absent at start (camera unplugged, stream not up, file not "
            "yet written): a count, or 'forever'; backoff 0.5 s doubling to 8 s."
        },
    )

    def __post_init__(self) -> None:
        _as_enum(self, "drop_policy", DropPolicy, "--drop-policy")
        _at_least("--max-frames", self.max_frames, 0)
        _at_least("--batch", self.batch, 1)
        _at_least("--queue-size", self.queue_size, 1)
        _at_least("--status-interval", self.status_interval, 0)
        parse_retry(self.retry)
        if self.threaded is False and self.drop_policy is DropPolicy.latest:
            raise ValueError("--drop-policy latest needs threaded capture (not --no-threaded)")

    @property
    def retries(self) -> int | None:
        """``retry`` as a count of retries after the first failed open (None: forever)."""
        return parse_retry(self.retry)

    @property
    def status_every_s(self) -> float | None:
        """Seconds between status records, None for none."""
        return self.status_interval or None


@dataclass(frozen=True, kw_only=True)
class OutputOptions:
    """Where records go: a ZeroMQ publisher, a JSON-lines file, and the outputs that need the frame
    itself (a recording, an annotated video, the Foxglove live view).

    Parameters
    ----------
    publish, jsonl, topic, hwm, wait_subscribers, wait_timeout, curve_secret:
        Where records go, as ``rrise run``'s flags of the same names (each field's ``help``).
    record, record_format, save_video, foxglove, no_output:
        The outputs that need the frame itself, and ``--no-output``.

    Raises
    ------
    ValueError
        A value out of range or a contradiction (``--no-output`` with an output, ``--curve-secret``
        without ``--publish``), naming the flag.

    >>> OutputOptions(jsonl="-").frame_outputs
    False
    >>> try:
    ...     OutputOptions(jsonl="-", no_output=True)
    ... except ValueError as exc:
    ...     print(str(exc)[:40])
    --no-output contradicts the outputs aske
    """

    publish: str | None = field(
        default=None,
        metadata={
            "help": "ZeroMQ endpoint to bind and publish on, on one interface: e.g. tcp://127.0.0.1:5555 "
            "or tcp://192.168.1.10:5555 (tcp://*:5555 only with --curve-secret). Records published "
            "before a subscriber connects are lost: see --wait-subscribers."
        },
    )
    jsonl: str | None = field(
        default=None, metadata={"help": "Write records as JSON lines to a file, or '-' for stdout."}
    )
    topic: str = field(
        default=DEFAULT_TOPIC.decode(),
        metadata={"help": "Topic of the published records (status records: TOPIC.status)."},
    )
    hwm: int = field(
        default=1000,
        metadata={"help": "Records queued per subscriber; one this far behind loses the newest records."},
    )
    wait_subscribers: int = field(
        default=0,
        metadata={
            "help": "With --publish: wait (up to --wait-timeout s) for this many subscribers before the "
            "first frame, so a short file is not published to no one."
        },
    )
    wait_timeout: float = field(
        default=5.0, metadata={"help": "Seconds --wait-subscribers waits before starting anyway."}
    )
    curve_secret: Path | None = field(
        default=None,
        metadata={
            "help": "Encrypt --publish with CURVE using this secret key file (from `rrise keys NAME "
            "--kind curve`: NAME.curve.key); subscribers need NAME.curve.pub."
        },
    )
    record: Path | None = field(
        default=None,
        metadata={
            "metavar": "PATH",
            "help": "Record the frames (JPEG) and records, stamped with their capture time: a .mcap file "
            "that Foxglove opens as is, or with --record-format ros2 a ROS 2 bag folder.",
        },
    )
    record_format: RecordFormat = field(
        default=RecordFormat.foxglove,
        metadata={
            "help": "foxglove: Foxglove schemas (protobuf images, JSON records) in one .mcap file; ros2: a "
            "ROS 2 bag (CDR, rrise_msgs/CertifiedPrediction) for `ros2 bag play`."
        },
    )
    save_video: Path | None = field(
        default=None,
        metadata={
            "metavar": "FILE",
            "help": "Write every frame with its label, radius (and a bar against the largest radius "
            "the bundle can certify), abstain, error and alarm drawn on it (.mp4, .avi, .mkv).",
        },
    )
    foxglove: str | None = field(
        default=None,
        metadata={
            "metavar": "[HOST:PORT]",
            "help": "Serve frames, records and status live to the Foxglove app (Foxglove WebSocket) "
            f"on HOST:PORT; alone: {FOXGLOVE_DEFAULT}.",
        },
    )
    no_output: bool = field(
        default=False,
        metadata={"help": "Certify and discard every record (e.g. to time a bundle), without a warning."},
    )

    def __post_init__(self) -> None:
        _as_enum(self, "record_format", RecordFormat, "--record-format")
        _at_least("--hwm", self.hwm, 1)
        _at_least("--wait-subscribers", self.wait_subscribers, 0)
        _at_least("--wait-timeout", self.wait_timeout, 0)
        if not self.topic:
            raise ValueError("--topic must not be empty")
        if self.curve_secret is not None and not self.publish:
            raise ValueError("--curve-secret needs --publish (it encrypts the published stream)")
        if self.no_output and (self.publish or self.jsonl or self.frame_outputs):
            raise ValueError("--no-output contradicts the outputs asked for (--publish, --jsonl, --record…)")

    @property
    def frame_outputs(self) -> bool:
        """Whether an output needs the frames themselves (recording, video, live view)."""
        return bool(self.record or self.save_video or self.foxglove)


@dataclass(frozen=True, kw_only=True)
class WatchOptions:
    """The premise checks of every frame: the distribution-shift alarm (the *monitor*, a windowed
    test) and the per-frame out-of-distribution flag (*ood*). ``watch=False`` turns both off. The
    values are checked against the bundle's reference when the run starts (naming the setting).

    Parameters
    ----------
    watch:
        ``--monitor/--no-monitor``: the shift alarm and the out-of-distribution flag, or neither.
    monitor_window, monitor_step, monitor_false_alarm:
        The shift alarm's settings (None: the bundle's).
    ood, ood_rate:
        The per-frame out-of-distribution p-value and its flag rate.

    >>> WatchOptions(monitor_window=100, ood=False).monitor_options()
    {'window': 100, 'ood': False}
    """

    watch: bool = field(
        default=True,
        metadata={
            "help": "Watch the premise: the distribution-shift alarm and the out-of-distribution flag "
            "(--no-monitor: neither).",
            "flag": "--monitor",
        },
    )
    monitor_window: int | None = field(
        default=None,
        metadata={
            "help": "Records in each window of the distribution-shift test (default: the bundle's, 200)."
        },
    )
    monitor_step: int | None = field(
        default=None,
        metadata={"help": "Test the last window every this many records (default: a quarter of the window)."},
    )
    monitor_false_alarm: float | None = field(
        default=None,
        metadata={
            "help": "Probability of a false shift alarm per window of in-distribution records "
            "(default: the bundle's, 0.001)."
        },
    )
    ood: bool = field(
        default=True,
        metadata={"help": "The per-frame out-of-distribution p-value and flag (--no-ood: none)."},
    )
    ood_rate: float | None = field(
        default=None,
        metadata={
            "help": "Flag a frame 'ood' when its out-of-distribution p-value (ood_p) is at most this: "
            "the rate clean frames are flagged at. 0: report ood_p only. Default 0.001, or 1/(n+1) "
            "for a bundle whose reference has n < 999 inputs."
        },
    )

    def monitor_options(self) -> dict[str, Any]:
        """The overrides :func:`rrise.monitor.load_monitors` takes (unset: the bundle's)."""
        given = {
            "window": self.monitor_window,
            "step": self.monitor_step,
            "false_alarm": self.monitor_false_alarm,
            "ood_rate": self.ood_rate,
        }
        options = {k: v for k, v in given.items() if v is not None}
        return options if self.ood else {**options, "ood": False}


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """Everything about how a run goes, one group per concern (see the module docstring). The
    bundle and the source are what a run is about: :func:`~rrise.runtime.run_stream` takes them
    beside these options.

    Parameters
    ----------
    backend, precision, expect_id, trust, min_release:
        Which variant runs where, and which bundle is accepted (``rrise run``'s flags).
    stream:
        :class:`StreamOptions`.
    outputs:
        :class:`OutputOptions`.
    watch:
        :class:`WatchOptions`.
    mc:
        :class:`~rrise.runtime.adaptive.McOptions` (``--mc-budget`` 0, the default: one pass).

    Raises
    ------
    ValueError
        A ``backend`` or ``precision`` that is not one of the choices, naming the flag.

    >>> options = RunOptions(outputs=OutputOptions(jsonl="-"), stream=StreamOptions(batch=4))
    >>> options.backend.value, options.outputs.jsonl, options.stream.batch, options.watch.watch
    ('auto', '-', 4, True)
    >>> options.mc.mc_budget, options.mc.enabled
    (0, False)
    """

    backend: BackendName = field(default=BackendName.auto, metadata={"help": "Inference backend."})
    precision: Precision | None = field(
        default=None,
        metadata={
            "help": "Run the bundle's variant of this precision (certified with that variant's own "
            "quantile); default: an engine for this GPU if any, else fp32."
        },
    )
    expect_id: str | None = field(
        default=None,
        metadata={
            "help": "Refuse any bundle whose id (shown by `rrise inspect`, carried by every record) "
            "is not this one."
        },
    )
    trust: Path | None = field(
        default=None,
        metadata={
            "help": "Ed25519 public key (KEY.pub from `rrise keys`): refuse a bundle unless its "
            "manifest.sig is this key's valid signature of its manifest."
        },
    )
    min_release: int | None = field(
        default=None,
        metadata={
            "help": "With --trust: refuse a bundle whose signature states a lower release number "
            "(or none), so that an older signed bundle cannot be rolled back in."
        },
    )
    stream: StreamOptions = field(default_factory=StreamOptions, metadata={"group": "Stream"})
    outputs: OutputOptions = field(default_factory=OutputOptions, metadata={"group": "Outputs"})
    watch: WatchOptions = field(
        default_factory=WatchOptions, metadata={"group": "Watch: shift alarm and out-of-distribution flag"}
    )
    mc: McOptions = field(
        default_factory=McOptions,
        metadata={"group": "Adaptive: Monte Carlo draws where the surrogate's radius falls short"},
    )

    def __post_init__(self) -> None:
        _as_enum(self, "backend", BackendName, "--backend")
        _as_enum(self, "precision", Precision, "--precision")
