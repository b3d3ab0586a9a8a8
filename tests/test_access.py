"""Who may send: allowed calling AE titles bound to hosts, reloaded on SIGHUP."""

import signal
import subprocess

from click.testing import CliRunner
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from scp.cli import main
from storage.catalog import Catalog
from storage.catalog.engines import IndexLocation
from tests.conftest import (
    CT_IMAGE_STORAGE,
    IMAGING_SCP,
    association_rejection,
    free_port,
    make_instance,
)


def _associate(port: int, calling: str):
    ae = AE(calling)
    ae.add_requested_context(CT_IMAGE_STORAGE, ExplicitVRLittleEndian)
    return ae.associate("127.0.0.1", port, ae_title="IMAGING_SCP")


def _rejected_as_unknown_caller(port: int, calling: str) -> bool:
    rejection = association_rejection(port, calling=calling)
    return rejection is not None and (rejection[0], rejection[2]) == (0x01, 0x03)


def test_only_allowed_callers_from_their_hosts_get_in(server_factory, tmp_path):
    config = tmp_path / "callers.toml"
    config.write_text(
        '[allowed_callers]\nCT_1 = ["127.0.0.1"]\nMR_1 = ["10.99.0.0/16"]\nANYWHERE = []\n'
    )
    server = server_factory("--config", str(config))
    for caller in ("CT_1", "ANYWHERE"):
        assoc = _associate(server.port, caller)
        assert assoc.is_established, caller
        assoc.release()
    for caller in ("MR_1", "STRANGER"):
        assert _rejected_as_unknown_caller(server.port, caller), caller
    rejected = server.wait_for_event("association.rejected", count=2)
    assert [(e["calling_ae"], e["peer"].split(":")[0]) for e in rejected] == [
        ("MR_1", "127.0.0.1"),
        ("STRANGER", "127.0.0.1"),
    ]
    assert all(e["permanent"] for e in rejected)


def test_flags_give_allowed_callers_too(server_factory):
    server = server_factory("--allowed-callers", "CT_1@127.0.0.0/8", "--allowed-callers", "MR_1")
    assert _associate(server.port, "MR_1").is_established
    assert _rejected_as_unknown_caller(server.port, "PT_1")


def test_sighup_reloads_callers_without_dropping_associations_in_flight(server_factory, tmp_path):
    config = tmp_path / "callers.toml"
    config.write_text('[allowed_callers]\nCT_1 = ["127.0.0.1"]\n')
    server = server_factory("--config", str(config))
    assert _rejected_as_unknown_caller(server.port, "MR_1")
    in_flight = _associate(server.port, "CT_1")
    assert in_flight.is_established

    config.write_text('[allowed_callers]\nMR_1 = ["127.0.0.0/8"]\n')
    server.process.send_signal(signal.SIGHUP)
    assert server.wait_for_event("reload.done")[0]["allowed_callers"] == ["MR_1"]

    study, series = generate_uid(), generate_uid()
    assert (
        in_flight.send_c_store(make_instance(tmp_path, study_uid=study, series_uid=series)).Status
        == 0
    )
    in_flight.release()
    assert _associate(server.port, "MR_1").is_established
    assert _rejected_as_unknown_caller(server.port, "CT_1")

    config.write_text("[allowed_callers]\nMR_1 = 42\n")  # a bad reload keeps the old list
    server.process.send_signal(signal.SIGHUP)
    assert "allowed_callers" in server.wait_for_event("reload.failed")[0]["reason"]
    assert _associate(server.port, "MR_1").is_established


def test_host_names_are_resolved_by_serve_only(tmp_path):
    """Issue 13: every admin command resolved the host names of allowed_callers
    (a slow or absent DNS made `studies` wait); `serve` and `check-config`, which
    need the addresses, still do, and say which name did not resolve."""
    config = tmp_path / "callers.toml"
    config.write_text('[allowed_callers]\nCT_1 = ["ct-1.no-such-host.invalid"]\n')
    data = tmp_path / "data"
    data.mkdir()
    Catalog.open(IndexLocation(data)).close()  # an empty index

    studies = CliRunner().invoke(main, ["studies", "--config", str(config), "--data-dir",
                                        str(data)])  # fmt: skip
    assert studies.exit_code == 0, studies.output

    serve = [IMAGING_SCP, "serve", "--port", str(free_port()), "--config", str(config),
             "--data-dir", str(data)]  # fmt: skip
    for args in (serve, [IMAGING_SCP, "check-config", str(config)]):
        result = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, (args, result.stderr)
        assert "ct-1.no-such-host.invalid" in result.stderr
        assert "key 'allowed_callers'" in result.stderr
