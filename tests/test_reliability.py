"""Reliability: many simultaneous senders, and SIGKILL in the middle of ingest.

Both tests drive a real `imaging-scp serve` process with real associations and
judge only what a user can see: the statuses senders get, the files on disk, the
index, the logs, and the admin commands.
"""

import json
import random
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from storage.files import instance_relpath
from tests.conftest import (
    CT_IMAGE_STORAGE,
    IMAGING_SCP,
    STORESCU,
    Server,
    dataset_bytes,
    holding_descriptors,
    make_instance,
    requires_dcmtk,
    start_server,
    stored_files,
    temp_files,
)
from tests.test_hostile import AssociationRefused, RawAssociation

SUCCESS = 0x0000


def cli(*args: str, data_dir: Path) -> subprocess.CompletedProcess:
    """Run an admin command; the timeout only keeps a hung command from hanging the run."""
    return subprocess.run(
        [IMAGING_SCP, *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def requesting_ae(calling: str) -> AE:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CT_IMAGE_STORAGE, ExplicitVRLittleEndian)
    return ae


# --- many simultaneous associations -------------------------------------------

SENDERS = 20
PER_SENDER = 10


@dataclass
class Sender:
    """One thread with its own AE and association, and what it was answered."""

    number: int
    study_uid: str
    series_uid: str
    files: list[Path]
    statuses: dict[str, int] = field(default_factory=dict)  # SOP Instance UID -> status
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class ReaderRun:
    returncode: int
    stdout: str
    stderr: str
    senders_done: int  # how many senders had finished when this run returned


def _send(sender: Sender, port: int, everyone_associated: threading.Barrier, gate) -> None:
    # The upper layer spoken by hand (tests/test_hostile.py), one blocking socket
    # per sender: twenty pynetdicom requestors in one process meet pynetdicom's
    # own race between send_c_store and its reactor, which can take the
    # C-STORE-RSP off the queue first and leave the sender waiting out its DIMSE
    # timeout (pydicom/pynetdicom#435, #842); a fast acceptor makes it likely.
    contexts = [(1, CT_IMAGE_STORAGE, [ExplicitVRLittleEndian])]
    try:
        try:
            assoc = RawAssociation(port, contexts, calling=f"SENDER{sender.number:02d}")
        except AssociationRefused:
            sender.error = "association was not accepted"
            everyone_associated.abort()
            return
        try:
            everyone_associated.wait(timeout=60)
            for position, path in enumerate(sender.files):
                if position == len(sender.files) - 1 and not gate.wait(timeout=60):
                    sender.error = "the first `studies --json` never finished"
                    return
                sop_instance_uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
                response = assoc.store(1, CT_IMAGE_STORAGE, sop_instance_uid, dataset_bytes(path))
                sender.statuses[sop_instance_uid] = response.status
        finally:
            assoc.release()
    except Exception as exc:  # reported by the test, with the sender's number
        sender.error = f"{type(exc).__name__}: {exc}"
        everyone_associated.abort()
    finally:
        sender.done.set()


def test_twenty_simultaneous_associations_into_shared_series(server, tmp_path):
    studies = [generate_uid() for _ in range(3)]
    # Six series: three in the first study, two in the second, one in the third;
    # sender i sends into series i % 6, so every series has three or four senders.
    series = [(studies[n], generate_uid()) for n in (0, 0, 0, 1, 1, 2)]
    senders = []
    for number in range(SENDERS):
        study_uid, series_uid = series[number % len(series)]
        files = [
            make_instance(
                tmp_path / f"sender{number}",
                study_uid=study_uid,
                series_uid=series_uid,
                InstanceNumber=number * PER_SENDER + n + 1,
            )
            for n in range(PER_SENDER)
        ]
        senders.append(Sender(number, study_uid, series_uid, files))

    everyone_associated = threading.Barrier(SENDERS)
    # Each sender keeps its last instance until the first reader has returned:
    # that reader provably ran, and finished, while every association was open.
    first_read_done = threading.Event()
    threads = [
        threading.Thread(
            target=_send, args=(s, server.port, everyone_associated, first_read_done), daemon=True
        )
        for s in senders
    ]
    for thread in threads:
        thread.start()

    # A reader while ingest runs: `studies --json`, again and again until ingest is over.
    reads: list[ReaderRun] = []
    try:
        server.wait_for_event("instance.stored", count=SENDERS, timeout=60)
        while True:
            ingest_over = all(s.done.is_set() for s in senders)
            result = cli("studies", "--json", data_dir=server.data_dir)
            finished = sum(s.done.is_set() for s in senders)
            reads.append(ReaderRun(result.returncode, result.stdout, result.stderr, finished))
            first_read_done.set()
            if ingest_over or result.returncode != 0:
                break
    finally:
        first_read_done.set()
        for thread in threads:
            thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a sender never finished"

    # Every sender associated, sent everything, and was answered Success.
    assert [(s.number, s.error) for s in senders if s.error] == []
    answers = {uid: code for s in senders for uid, code in s.statuses.items()}
    assert len(answers) == SENDERS * PER_SENDER
    assert {uid: code for uid, code in answers.items() if code != SUCCESS} == {}

    # The reader: exit 0 every time, and the first returned while every sender
    # still had its association open and an instance to send.
    assert [(r.returncode, r.stderr) for r in reads if r.returncode != 0] == []
    assert reads[0].senders_done == 0
    totals = []
    for run in reads:
        listed = {study["uid"]: study for study in json.loads(run.stdout)}
        assert set(listed) <= set(studies)
        totals.append(sum(study["numberOfInstances"] for study in listed.values()))
    assert totals == sorted(totals) and totals[-1] == len(answers), totals
    final = {study["uid"]: study for study in json.loads(reads[-1].stdout)}

    # The index counts are exact, per series and per study.
    expected_series = Counter(s.series_uid for s in senders for _ in s.files)
    expected_studies = Counter(s.study_uid for s in senders for _ in s.files)
    index = server.index()
    series_rows = {
        row["series_uid"]: row
        for row in index.execute("SELECT * FROM series WHERE study_uid IN (?, ?, ?)", studies)
    }
    assert {uid: row["number_of_instances"] for uid, row in series_rows.items()} == dict(
        expected_series
    )
    assert {uid: series_rows[uid]["study_uid"] for uid in series_rows} == {
        series_uid: study_uid for study_uid, series_uid in series
    }
    instance_rows = Counter(
        row["series_uid"] for row in index.execute("SELECT series_uid FROM instances")
    )
    assert instance_rows == expected_series
    study_rows = {
        row["study_uid"]: (row["number_of_series"], row["number_of_instances"])
        for row in index.execute("SELECT * FROM studies")
    }
    assert study_rows == {
        study_uid: (sum(1 for st, _ in series if st == study_uid), expected_studies[study_uid])
        for study_uid in studies
    }
    assert {uid: (s["numberOfSeries"], s["numberOfInstances"]) for uid, s in final.items()} == (
        study_rows
    )

    # Every instance answered Success is indexed and on disk, as sent.
    indexed = {
        row["sop_instance_uid"]: row["path"]
        for row in index.execute("SELECT sop_instance_uid, path FROM instances")
    }
    assert set(indexed) == set(answers)
    for sender in senders:
        for path in sender.files:
            uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
            stored = server.data_dir / instance_relpath(sender.study_uid, sender.series_uid, uid)
            assert indexed[uid] == str(stored.relative_to(server.data_dir))
            assert pydicom.dcmread(stored).SOPInstanceUID == uid
            assert dataset_bytes(stored) == dataset_bytes(path)
    assert len(stored_files(server.data_dir)) == len(answers)

    # The log: no lock errors, no internal failures, every instance stored once.
    ends = server.wait_for_event("association.end", count=SENDERS)
    assert Counter(e["outcome"] for e in ends) == {"released": SENDERS}
    assert "database is locked" not in server.log_path.read_text()
    assert server.events("instance.failed") == []
    assert len(server.events("instance.stored")) == len(answers)
    assert all(e["outcome"] == "stored" for e in server.events("instance.stored"))


# --- SIGKILL in the middle of ingest ------------------------------------------

KILLS = 12
SEED = 20261122


@dataclass
class CrashSender:
    """Streams one series, one instance per C-STORE, to whichever port the
    server listens on now; after a failure it opens a new association. An
    instance left unanswered is sent again after every other failure, and
    given up on after the others (as a sender that moves on would): only startup
    recovery can index one of those that was placed but not committed."""

    directory: Path
    study_uid: str = field(default_factory=generate_uid)
    series_uid: str = field(default_factory=generate_uid)
    port: int = 0
    port_changed: threading.Condition = field(default_factory=threading.Condition)
    stop: threading.Event = field(default_factory=threading.Event)
    sent: dict[str, Path] = field(default_factory=dict)  # every instance tried, by UID
    succeeded: list[str] = field(default_factory=list)  # answered Success, in order
    refused: list[tuple[str, int, str | None]] = field(default_factory=list)
    lost: int = 0  # requests that got no answer (the server died)
    error: str | None = None

    def serve_on(self, port: int) -> None:
        with self.port_changed:
            self.port = port
            self.port_changed.notify_all()

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def _run(self) -> None:
        ae = requesting_ae("CRASHSCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        number = 0
        pending: tuple[str, Path] | None = None
        while not self.stop.is_set():
            port = self.port
            assoc = ae.associate("127.0.0.1", port, ae_title="IMAGING_SCP")
            if not assoc.is_established:
                self._wait_for_another_port(port)
                continue
            while assoc.is_established and not self.stop.is_set():
                if pending is None:
                    number += 1
                    path = make_instance(
                        self.directory,
                        study_uid=self.study_uid,
                        series_uid=self.series_uid,
                        InstanceNumber=number,
                    )
                    pending = (pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID, path)
                    self.sent[pending[0]] = path
                uid, path = pending
                try:
                    response = assoc.send_c_store(path)
                except Exception:  # the association died under the request
                    response = None
                code = response.get("Status") if response is not None else None
                if code == SUCCESS:
                    self.succeeded.append(uid)
                    pending = None
                elif code is None:
                    self.lost += 1
                    if self.lost % 2 == 0:
                        pending = None  # given up on
                    break
                else:
                    self.refused.append((uid, code, response.get("ErrorComment")))
                    pending = None
            if assoc.is_established:
                assoc.release()

    def _wait_for_another_port(self, failed_port: int) -> None:
        """After a refused connection: the server is down until the test starts
        another one and says where (bounded, in case it is up after all)."""
        with self.port_changed:
            self.port_changed.wait_for(
                lambda: self.port != failed_port or self.stop.is_set(), timeout=5
            )


def _describe(uid: str, sender: CrashSender, data_dir: Path, index) -> str:
    """Where an instance is, on disk and in the index: for a failure message."""
    relpath = instance_relpath(sender.study_uid, sender.series_uid, uid)
    on_disk = (data_dir / relpath).exists()
    row = index.execute(
        "SELECT path, received_at, association_id FROM instances WHERE sop_instance_uid = ?",
        (uid,),
    ).fetchone()
    return f"{uid}: on disk={on_disk}, index row={dict(row) if row else None}"


def test_sigkill_during_ingest_loses_nothing_that_was_answered_success(server_factory, tmp_path):
    rng = random.Random(SEED)
    data = tmp_path / "data"
    sender = CrashSender(tmp_path / "sent")
    servers: list[Server] = []
    thread = threading.Thread(target=sender.run, name="crash-sender", daemon=True)
    try:
        for kill in range(KILLS):
            server = server_factory(data_dir=data)
            servers.append(server)
            sender.serve_on(server.port)
            if kill == 0:
                thread.start()
            # Kill only once the sender is streaming into this server.
            server.wait_for_event("association.accepted", timeout=30)
            # Not a synchronisation: the random moment of the crash.
            time.sleep(rng.uniform(0.05, 0.4))
            server.process.kill()
            server.process.wait(10)
    finally:
        sender.stop.set()
        sender.serve_on(0)
        if thread.is_alive():
            thread.join(timeout=60)
    assert not thread.is_alive(), "the sender never stopped"
    assert sender.error is None

    # The last start finishes what the last crash left; then a clean stop.
    final = server_factory(data_dir=data)
    servers.append(final)
    assert final.stop() == 0
    assert final.events("stopped")

    # Nothing was refused, and the test did what it says: the server died under
    # requests in flight and came back each time.
    assert sender.refused == []
    assert sender.lost >= 1
    assert len(sender.succeeded) > KILLS
    assert len(set(sender.succeeded)) == len(sender.succeeded)

    index = final.index()
    rows = {
        row["sop_instance_uid"]: row
        for row in index.execute(
            "SELECT sop_instance_uid, series_uid, path FROM instances WHERE study_uid = ?",
            (sender.study_uid,),
        )
    }
    problems = [
        _describe(uid, sender, data, index)
        for uid in sender.succeeded
        if uid not in rows or not (data / rows[uid]["path"]).exists()
    ]
    incoming = [p.name for p in temp_files(data)]
    recovered = [e for s in servers for e in s.events("startup.recovered")]
    assert problems == [], (
        f"answered Success but not both on disk and indexed: {problems};"
        f" left in .incoming: {incoming}; startup recoveries: {recovered}"
    )

    # Every Success instance is on disk where the index says, byte for byte as sent.
    for uid in sender.succeeded:
        path = data / rows[uid]["path"]
        assert path == data / instance_relpath(sender.study_uid, sender.series_uid, uid)
        assert pydicom.dcmread(path).SOPInstanceUID == uid
        assert dataset_bytes(path) == dataset_bytes(sender.sent[uid])

    # Counted exactly once: the counts agree with the rows, and only instances
    # the sender sent are in the index (those it got no answer for may be).
    assert set(rows) <= set(sender.sent)
    series_row = index.execute(
        "SELECT number_of_instances FROM series WHERE series_uid = ?", (sender.series_uid,)
    ).fetchone()
    study_row = index.execute(
        "SELECT number_of_series, number_of_instances FROM studies WHERE study_uid = ?",
        (sender.study_uid,),
    ).fetchone()
    assert series_row["number_of_instances"] == len(rows)
    assert (study_row["number_of_series"], study_row["number_of_instances"]) == (1, len(rows))
    on_disk = {p.name.removesuffix(".dcm") for p in stored_files(data)}
    assert on_disk == set(rows), (
        f"on disk, not indexed: {sorted(on_disk - set(rows))};"
        f" indexed, not on disk: {sorted(set(rows) - on_disk)}; recoveries: {recovered}"
    )

    assert incoming == [], f"temp files left in .incoming: {incoming}"
    verify = cli("verify", "--checksum", data_dir=data)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    failed = [e for s in servers for e in s.events("instance.failed")]
    assert failed == []
    assert not any("database is locked" in s.log_path.read_text() for s in servers)


@requires_dcmtk()
def test_connections_on_descriptors_above_1023_are_served(tmp_path):
    """select() cannot watch a descriptor above 1023 and pynetdicom took its
    failure for a closed connection: every association a busy listener accepted
    was dropped before its A-ASSOCIATE-AC."""
    server = start_server(tmp_path / "data", launcher=holding_descriptors())
    try:
        study, series = generate_uid(), generate_uid()
        folder = tmp_path / "folder"
        for _ in range(3):
            make_instance(folder, study_uid=study, series_uid=series)
        result = subprocess.run(
            [STORESCU, "+sd", "-aec", "IMAGING_SCP", "127.0.0.1", str(server.port), str(folder)],
            capture_output=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr.decode()
        assert len(stored_files(server.data_dir)) == 3
    finally:
        server.stop()
