"""docs/metrics.md's scrape configuration and alert rules, loaded as written
into a real Prometheus that scrapes two real listeners: one below its disk
floor, one that refuses a C-STORE and cannot deliver a commitment report.
Each alert must go off for the listener in trouble, and only for it."""

import json
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.conftest import ECHOSCU, free_port, make_instance, requires_dcmtk, send_files
from tests.test_commitment import MODALITY, a_series, references, request_commitment
from tests.test_metrics import scrape

PROMETHEUS = shutil.which("prometheus")
DOC = Path(__file__).parent.parent / "docs" / "metrics.md"
DOC_TARGETS = '["rx-1.example:9112"]'

pytestmark = [
    requires_dcmtk(ECHOSCU),
    pytest.mark.skipif(
        PROMETHEUS is None, reason="prometheus not installed (apt-get install prometheus)"
    ),
]


def documented_yaml() -> tuple[str, str]:
    """The scrape configuration and the rules, as docs/metrics.md shows them."""
    scrape_config, rules = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S)
    assert DOC_TARGETS in scrape_config, "the documented scrape configuration's target moved"
    return scrape_config, rules


class Prometheus:
    def __init__(self, directory: Path, targets: list[str]):
        scrape_config, rules = documented_yaml()
        directory.mkdir()
        (directory / "rules.yml").write_text(rules)
        (directory / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "rule_files: [rules.yml]\n" + scrape_config.replace(DOC_TARGETS, json.dumps(targets))
        )
        self.port = free_port()
        self.process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(directory / "prometheus.log").open("w"),
        )
        self.log = directory / "prometheus.log"

    def api(self, path: str):
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)["data"]

    def wait(self, what: str, condition, seen, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"prometheus exited: {self.log.read_text()[-2000:]}"
            try:
                value = condition()
            except OSError:  # not listening yet
                value = None
            if value:
                return value
            assert time.monotonic() < deadline, f"{what} within {timeout} s: {seen()}"
            time.sleep(0.2)

    def scraped(self, target: str) -> bool:
        return any(
            t["scrapeUrl"].startswith(f"http://{target}/") and t["health"] == "up"
            for t in self.api("targets")["activeTargets"]
        )

    def alerts(self) -> set[tuple[str, str]]:
        """(alert name, instance) of every alert pending or firing."""
        return {
            (a["labels"]["alertname"], a["labels"]["instance"])
            for a in self.api("alerts")["alerts"]
        }

    def stop(self):
        self.process.terminate()
        self.process.wait(10)


def test_the_documented_alerts_go_off_for_the_listener_in_trouble_only(server_factory, tmp_path):
    full_metrics, refusing_metrics = free_port(), free_port()
    full = server_factory("--metrics-port", str(full_metrics), "--min-free-space", "1000TiB")
    refusing = server_factory("--metrics-port", str(refusing_metrics), "--duplicates", "reject")
    full_target, refusing_target = f"127.0.0.1:{full_metrics}", f"127.0.0.1:{refusing_metrics}"
    prometheus = Prometheus(tmp_path / "prometheus", [full_target, refusing_target])
    try:
        # As in a Prometheus that was running before the trouble began.
        prometheus.wait(
            "both listeners scraped",
            lambda: all(map(prometheus.scraped, [full_target, refusing_target])),
            lambda: prometheus.api("targets")["activeTargets"],
        )

        for _ in range(6):  # every association is rejected while the disk is below its floor
            subprocess.run(
                [ECHOSCU, "-aec", "IMAGING_SCP", "127.0.0.1", str(full.port)],
                capture_output=True,
                timeout=30,
            )
        rejected = scrape(full_metrics)(
            "imaging_scp_associations_rejected_total", reason="local-limit-exceeded"
        )
        assert rejected == 6
        # One C-STORE refused (0xC004, a different object under a stored UID), and
        # a commitment report with nowhere to go (MODALITY has no address in peers).
        [path] = a_series(tmp_path / "series", 1)
        stored = pydicom.dcmread(path)
        other = make_instance(
            tmp_path / "other",
            study_uid=stored.StudyInstanceUID,
            series_uid=stored.SeriesInstanceUID,
            sop_instance_uid=stored.SOPInstanceUID,
            pixels=32,
        )
        statuses = [r.status for r in send_files(refusing.port, [path, other], calling=MODALITY)]
        assert statuses == [0, 0xC004]
        request_commitment(refusing, generate_uid(), references([path]), wait_for_report=False)
        refusing.wait_for_event("commitment.delivery_failed")

        expected = {
            ("DicomDiskBelowFloor", full_target),
            ("DicomRefusalsRising", full_target),
            ("DicomRefusalsRising", refusing_target),
            ("DicomReportsFailing", refusing_target),
        }
        prometheus.wait("the alerts", lambda: expected <= prometheus.alerts(), prometheus.alerts)
        assert prometheus.alerts() == expected
    finally:
        prometheus.stop()
