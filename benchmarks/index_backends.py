"""Ingest on the SQLite index and on a PostgreSQL one (issue 14), in one run.

    .venv/bin/python -m benchmarks.index_backends [--instances 1500] [--rounds 3]

Prints, as ratios measured in the same run (interleaved rounds, median):
- one node, small instances over one association: PostgreSQL / SQLite (over TCP
  loopback, as from another host; over the Unix socket too, for a local server);
- four senders: two nodes sharing one PostgreSQL index / one node (on a 2-core
  machine this mostly measures the index, not the nodes);
- one association into a PostgreSQL index already holding 1,000,000 instances
  (rows made in SQL: 10,000 studies of 100) / into an empty one; the same SQLite rate;
- dcmtk's findscu (PatientID at STUDY level, whole process, median of 7) on both
  1,000,000-instance indexes.

Both backends fully durable: SQLite synchronous=FULL in WAL mode, PostgreSQL
synchronous_commit=on with fsync on (the cluster's defaults), on the same disk.
The PostgreSQL cluster is a private one started here (tests/postgres.py).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from pydicom.uid import generate_uid
from pynetdicom.dsutils import encode

from benchmarks.soak import CT_IMAGE_STORAGE, instance
from storage.catalog.engines import IndexLocation
from tests.conftest import start_server
from tests.postgres import Cluster, find_binaries


def send(port: int, count: int, study: str, pixels: bytes, calling: str = "BENCH") -> None:
    from tests.test_hostile import EXPLICIT_LE, RawAssociation

    series = generate_uid()
    datasets = [instance(study, series, n, pixels) for n in range(count)]
    encoded = [(ds.SOPInstanceUID, encode(ds, False, True)) for ds in datasets]
    assoc = RawAssociation(port, [(1, CT_IMAGE_STORAGE, [EXPLICIT_LE])], calling=calling)
    try:
        for uid, data in encoded:
            status = assoc.store(1, CT_IMAGE_STORAGE, uid, data).status
            if status != 0:
                raise RuntimeError(f"status 0x{status:04X}")
    finally:
        assoc.release()


def rate(ports: list[int], senders: int, count: int, pixels: bytes) -> float:
    """Instances per second, `senders` associations at once spread over `ports`."""
    each = count // senders
    errors = []

    def one(n: int) -> None:
        try:
            send(ports[n % len(ports)], each, generate_uid(), pixels)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(senders)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return each * senders / (time.perf_counter() - started)


def fill(location: IndexLocation, studies: int = 10_000, per_study: int = 100) -> None:
    """An index of studies × per_study instances, made in SQL (the same on both
    engines; the schema is imaging-scp's)."""
    db = location.open()
    numbers = "WITH RECURSIVE n(x) AS (SELECT 0 UNION ALL SELECT x + 1 FROM n WHERE x < ?)"
    received = "'2026-01-01T00:00:00.000Z'"
    db.execute("BEGIN")
    db.execute(
        "INSERT INTO studies (study_uid, patient_id, study_date, modalities, number_of_series,"
        f" number_of_instances, bytes, availability, first_received, last_received) {numbers}"
        " SELECT '1.2.826.0.1.9.' || x, 'P' || x, '20260101', '[\"CT\"]', 1, ?, 0, 'ONLINE',"
        f" {received}, {received} FROM n WHERE x > 0",
        (studies, per_study),
    )
    db.execute(
        "INSERT INTO series (series_uid, study_uid, modality, number_of_instances, bytes,"
        f" availability, first_received, last_received) {numbers}"
        " SELECT '1.2.826.0.2.9.' || x, '1.2.826.0.1.9.' || x, 'CT', ?, 0, 'ONLINE',"
        f" {received}, {received} FROM n WHERE x > 0",
        (studies, per_study),
    )
    db.execute(
        "INSERT INTO instances (sop_instance_uid, series_uid, study_uid, sop_class_uid,"
        f" transfer_syntax, path, size, sha256, received_at) {numbers}"
        " SELECT '1.2.826.0.3.9.' || x, '1.2.826.0.2.9.' || (x / ? + 1),"
        " '1.2.826.0.1.9.' || (x / ? + 1), ?, '1.2.840.10008.1.2.1', 'x/' || x, 0, '',"
        f" {received} FROM n",
        (studies * per_study - 1, per_study, per_study, CT_IMAGE_STORAGE),
    )
    db.execute("COMMIT")
    db.execute("VACUUM ANALYZE" if location.url else "ANALYZE")
    db.close()


def findscu_ms(port: int, runs: int = 7) -> float:
    """dcmtk's findscu, PatientID at STUDY level, as a whole process: median ms."""
    from benchmarks.find_queries import time_findscu

    return statistics.median(time_findscu(port, "P1234", runs)) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    binaries = find_binaries()
    if binaries is None:
        print("PostgreSQL not installed (apt-get install postgresql)", file=sys.stderr)
        return 2
    pixels = os.urandom(64 * 64 * 2)
    cluster = Cluster.start(binaries)
    work = Path(tempfile.mkdtemp(prefix="bench-index-"))
    servers = []

    def serve(name: str, url: str, node: str = "n1"):
        server = start_server(work / name, "--node-name", node, index_url=url)
        servers.append(server)
        return server

    try:
        sqlite = serve("sqlite", "")
        pg_url = cluster.new_database()
        pg_one = serve("pg", pg_url)
        pg_socket = serve("pg-socket", cluster.socket_url(cluster.new_database().rsplit("/", 1)[1]))
        pg_two = serve("pg", pg_url, "n2")
        full = serve("full", cluster.new_database())
        empty = serve("empty", cluster.new_database())
        sqlite_full = serve("sqlite-full", "")
        for server in (full, sqlite_full):
            fill(IndexLocation(server.data_dir, server.index_url))
        figures: dict[str, list[float]] = {}
        for _ in range(args.rounds):  # interleaved: each round measures every case once
            for name, ports, senders in (
                ("sqlite, 1 association", [sqlite.port], 1),
                ("postgresql, 1 association", [pg_one.port], 1),
                ("postgresql over a Unix socket, 1 association", [pg_socket.port], 1),
                ("postgresql, 1 node, 4 senders", [pg_one.port], 4),
                ("postgresql, 2 nodes, 4 senders", [pg_one.port, pg_two.port], 4),
                ("postgresql empty, 1 association", [empty.port], 1),
                ("postgresql 1,000,000 indexed, 1 association", [full.port], 1),
                ("sqlite 1,000,000 indexed, 1 association", [sqlite_full.port], 1),
            ):
                figures.setdefault(name, []).append(rate(ports, senders, args.instances, pixels))
        medians = {name: statistics.median(values) for name, values in figures.items()}
        queries = {
            "findscu PatientID, 1,000,000 indexed, sqlite (ms)": findscu_ms(sqlite_full.port),
            "findscu PatientID, 1,000,000 indexed, postgresql (ms)": findscu_ms(full.port),
        }
        for name, value in medians.items():
            print(
                f"{name:48} {value:8.0f} instances/s   rounds {[round(v) for v in figures[name]]}"
            )
        ratios = {
            "postgresql / sqlite (1 association)": medians["postgresql, 1 association"]
            / medians["sqlite, 1 association"],
            "2 nodes / 1 node (4 senders, postgresql)": medians["postgresql, 2 nodes, 4 senders"]
            / medians["postgresql, 1 node, 4 senders"],
            "1,000,000 indexed / empty (postgresql)": medians[
                "postgresql 1,000,000 indexed, 1 association"
            ]
            / medians["postgresql empty, 1 association"],
        }
        for name, value in ratios.items():
            print(f"{name:48} {value:8.2f}x")
        for name, value in queries.items():
            print(f"{name:54} {value:8.1f}")
        print(json.dumps({"medians": medians, "ratios": ratios, "queries": queries,
                          "instances": args.instances}))  # fmt: skip
    finally:
        for server in servers:
            server.stop()
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
