"""Several listener processes on one port (workers > 1)."""

import os
import signal
import subprocess
import threading

from pydicom.uid import generate_uid

from tests.conftest import both_indexes, make_instance, send_files

pytestmark = both_indexes


def _children(pid: int) -> set[int]:
    result = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return {int(line) for line in result.stdout.split()}


def test_workers_share_the_port_and_the_index(server_factory, tmp_path):
    server = server_factory("--workers", "2")
    workers = _children(server.process.pid)
    assert len(workers) == 1
    study, series = generate_uid(), generate_uid()
    batches = [
        [make_instance(tmp_path / str(n), study_uid=study, series_uid=series) for _ in range(5)]
        for n in range(12)
    ]
    results = []

    def send(batch):
        results.extend(send_files(server.port, batch))

    threads = [threading.Thread(target=send, args=(batch,)) for batch in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [r.status for r in results] == [0] * 60
    row = (
        server.index()
        .execute("SELECT number_of_instances FROM series WHERE series_uid = ?", (series,))
        .fetchone()
    )
    assert row["number_of_instances"] == 60
    ends = server.wait_for_event("association.end", count=12)
    pids = {event["assoc"].split("-")[0] for event in ends}
    assert pids == {f"{pid:x}" for pid in (server.process.pid, *workers)}  # both served

    assert server.stop() == 0
    assert all(not os.path.exists(f"/proc/{pid}") for pid in workers)


def test_a_dead_worker_stops_the_service_for_a_restart(server_factory):
    server = server_factory("--workers", "2")
    (worker,) = _children(server.process.pid)
    os.kill(worker, signal.SIGKILL)
    assert server.process.wait(30) == 1
    assert server.events("worker.died")
