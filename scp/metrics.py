"""Prometheus metrics: what the listener did, counted where it is logged, and
what the index and the disk hold, read when scraped.

`start` builds this process's `Recorder` (kept in `recorder`; None while
`metrics_port` is 0), before the workers fork: each worker then counts into its
own files of the multiprocess directory, which the main process's endpoint
sums. The places that log an event count it too, with one call on an object
prepared in advance: a stored instance costs one counter per outcome, one for
its bytes and one histogram per stage, no label lookup.

prometheus_client is imported inside the functions: it chooses where values
live (this process's memory, or PROMETHEUS_MULTIPROC_DIR's files) when it is
first imported, which must come after `start` has decided.
"""

import os
import shutil
import tempfile

from scp.config import Config
from storage.catalog.commitments import CHECKING, DELIVERED, DELIVERING, FAILED, PENDING
from storage.catalog.reads import CatalogReader
from storage.store import InstanceStore, Outcome, StoreResult

# This process's recorder, set by `start`; None when metrics are off.
recorder: "Recorder | None" = None

_PREFIX = "imaging_scp_"
# Stage times run from tens of microseconds (check) to seconds (fsync on a busy disk).
_STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                  0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # fmt: skip
_STAGES = ("receive", "check", "fsync", "place", "index")
_RETRIEVE_OPERATIONS = ("move", "get")
_SUB_OPERATION_RESULTS = ("completed", "failed", "warning")


class Recorder:
    """The counters, gauges and histograms the listener's events feed."""

    def __init__(self):
        from prometheus_client import Counter, Gauge, Histogram

        # Here, not at the top: they count through this module.
        from scp import (
            association,
            commitment_service,
            find_service,
            retrieve_service,
            store_service,
        )

        stored = Counter(_PREFIX + "instances_stored", "Instances stored, by outcome", ["outcome"])
        self._stored = {outcome: stored.labels(str(outcome)) for outcome in Outcome}
        self._refused = Counter(
            _PREFIX + "instances_refused",
            "C-STORE requests refused or failed, by status",
            ["status"],
        )
        # Every value a label can take is exported at 0 from the start: a series
        # that appears at its first event hides that event from increase() and rate().
        for status in store_service.FAILURE_STATUSES:
            self._refused.labels(f"0x{status:04X}")
        self._bytes = Counter(_PREFIX + "received_bytes", "Bytes of the instances stored")
        stages = Histogram(
            _PREFIX + "store_stage_seconds",
            "Time of each stage of a C-STORE (receive, check, fsync, place, index)",
            ["stage"],
            buckets=_STAGE_BUCKETS,
        )
        self._stages = {stage: stages.labels(stage) for stage in _STAGES}
        self._associations = Counter(
            _PREFIX + "associations",
            "Connections ended, by outcome (released, aborted, rejected, closed: no association)",
            ["outcome"],
        )
        for outcome in association.OUTCOMES:
            self._associations.labels(outcome)
        self._rejected = Counter(
            _PREFIX + "associations_rejected",
            "Associations rejected, by the A-ASSOCIATE-RJ reason",
            ["reason"],
        )
        for reason in association.REJECTION_NAMES.values():
            self._rejected.labels(reason)
        self._active = Gauge(
            _PREFIX + "associations_active",
            "Connections being served now",
            multiprocess_mode="livesum",
        )
        self._find_queries = Counter(
            _PREFIX + "find_queries",
            "C-FIND queries ended, by outcome (success, cancelled, refused, failed)",
            ["outcome"],
        )
        for outcome in find_service.OUTCOMES:
            self._find_queries.labels(outcome)
        self._find_matches = Counter(_PREFIX + "find_matches", "C-FIND pending responses sent")
        self._retrieve_requests = Counter(
            _PREFIX + "retrieve_requests",
            "C-MOVE and C-GET requests ended, by operation (move, get) and outcome"
            " (success, warning, failed, cancelled, refused)",
            ["operation", "outcome"],
        )
        for operation in _RETRIEVE_OPERATIONS:
            for outcome in retrieve_service.OUTCOMES:
                self._retrieve_requests.labels(operation, outcome)
        sub_operations = Counter(
            _PREFIX + "retrieve_suboperations",
            "C-STORE sub-operations of C-MOVE and C-GET ended, by operation and result"
            " (completed, failed, warning)",
            ["operation", "result"],
        )
        self._sub_operations = {
            (operation, result): sub_operations.labels(operation, result)
            for operation in _RETRIEVE_OPERATIONS
            for result in _SUB_OPERATION_RESULTS
        }
        self._commitment_requests = Counter(
            _PREFIX + "commitment_requests", "Storage commitment requests (N-ACTION) accepted"
        )
        self._commitment_refused = Counter(
            _PREFIX + "commitment_refused",
            "Storage commitment requests refused, by status",
            ["status"],
        )
        for status in commitment_service.REFUSAL_STATUSES:
            self._commitment_refused.labels(f"0x{status:04X}")
        committed = Counter(
            _PREFIX + "commitment_instances",
            "Instances checked for a commitment request, by result (committed, failed)",
            ["result"],
        )
        self._committed, self._not_committed = (
            committed.labels("committed"),
            committed.labels("failed"),
        )
        reports = Counter(
            _PREFIX + "commitment_reports_ended",
            "Commitment reports delivered, or given up on",
            ["outcome"],
        )
        self._reports_delivered = reports.labels("delivered")
        self._reports_given_up = reports.labels("given-up")
        self._report_failures = Counter(
            _PREFIX + "commitment_report_failures",
            "Commitment report deliveries that failed (retried, unless given up)",
        )

    def stored(self, result: StoreResult) -> None:
        self._stored[result.outcome].inc()
        self._bytes.inc(result.size)
        stages = self._stages
        for stage, ms in result.timings.items():
            histogram = stages.get(stage)
            if histogram is not None:
                histogram.observe(ms / 1000)

    def refused(self, status: int) -> None:
        self._refused.labels(f"0x{status:04X}").inc()

    def association_started(self) -> None:
        self._active.inc()

    def association_ended(self, outcome: str) -> None:
        self._active.dec()
        self._associations.labels(outcome).inc()

    def association_rejected(self, reason: str) -> None:
        self._rejected.labels(reason).inc()

    def find_ended(self, outcome: str, matches: int) -> None:
        self._find_queries.labels(outcome).inc()
        self._find_matches.inc(matches)

    def retrieve_ended(self, operation: str, outcome: str) -> None:
        self._retrieve_requests.labels(operation, outcome).inc()

    def sub_operation_ended(self, operation: str, result: str) -> None:
        self._sub_operations[operation, result].inc()

    def commitment_requested(self) -> None:
        self._commitment_requests.inc()

    def commitment_refused(self, status: int) -> None:
        self._commitment_refused.labels(f"0x{status:04X}").inc()

    def commitment_checked(self, committed: int, failed: int) -> None:
        self._committed.inc(committed)
        self._not_committed.inc(failed)

    def report_delivered(self) -> None:
        self._reports_delivered.inc()

    def report_failed(self, gave_up: bool) -> None:
        self._report_failures.inc()
        if gave_up:
            self._reports_given_up.inc()


def start(config: Config) -> None:
    """Make this process's `recorder` (before the workers fork: they inherit it).
    With several workers, their values go to files in a new directory."""
    global recorder
    # A directory of our own, new and empty as the client's multiprocess mode
    # needs, whatever the environment named (Endpoint removes it at stop).
    for name in ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir"):  # the old spelling
        os.environ.pop(name, None)
    if config.workers > 1:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="imaging-scp-metrics-")
    recorder = Recorder()


class Endpoint:
    """The HTTP endpoint Prometheus scrapes (main process only), and its
    multiprocess directory, removed when it stops."""

    def __init__(self, config: Config, store: InstanceStore):
        from prometheus_client import (
            REGISTRY,
            CollectorRegistry,
            ProcessCollector,
            start_http_server,
        )
        from prometheus_client.multiprocess import MultiProcessCollector

        self.directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if self.directory:
            # The workers' values summed; process metrics are this process's only.
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            ProcessCollector(registry=registry)
        else:
            registry = REGISTRY  # with the client's process, platform and GC collectors
        registry.register(_Holdings(config, store))
        try:
            self._server, _ = start_http_server(
                config.metrics_port, config.metrics_host, registry=registry
            )
        except OSError:  # the service does not start: nothing will write there
            self._remove_directory()
            raise
        self.port = self._server.server_port

    def worker_ended(self, pid: int) -> None:
        """Its live gauges (associations active) no longer count."""
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(pid)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._remove_directory()

    def _remove_directory(self) -> None:
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)


class _Holdings:
    """What is kept, read at each scrape: the data filesystem's free space
    against its floor, the index's size and its commitment reports by state."""

    def __init__(self, config: Config, store: InstanceStore):
        self.config, self.store = config, store

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        free, floor = self.store.free_space()
        yield GaugeMetricFamily(
            _PREFIX + "data_free_bytes", "Free bytes of the data filesystem", value=free
        )
        yield GaugeMetricFamily(
            _PREFIX + "data_free_floor_bytes",
            "min_free_space in bytes: below it new objects are refused",
            value=floor,
        )
        available = self.store.index.health.available
        yield GaugeMetricFamily(
            _PREFIX + "index_available",
            "1 while the index answers, 0 during an outage",
            value=int(available),
        )
        if not available:  # a read would wait out the timeout, past the scrape's own
            return
        try:
            with CatalogReader.open(
                self.config.index_location, pooled=True, timeout=self.config.index_timeout
            ) as reader:
                size = reader.size()
                states = reader.commitment_states()
        except Exception:  # an index outage: index_available says so, the rest is absent
            return
        for name in ("studies", "series", "instances", "bytes"):
            yield GaugeMetricFamily(
                _PREFIX + f"index_{name}", f"{name.capitalize()} in the index", value=size[name]
            )
        reports = GaugeMetricFamily(
            _PREFIX + "commitment_reports",
            "Storage commitment requests by report delivery state"
            " (checking, pending, delivering, delivered, failed)",
            labels=["state"],
        )
        for state in (CHECKING, PENDING, DELIVERING, DELIVERED, FAILED):
            reports.add_metric([state], states.get(state, 0))
        yield reports
