"""Security checks (tests/reliability/security.py) under pytest, against one daemon with API keys,
an adapter root, body limits and 2-second connection timeouts."""
import pathlib
import shutil
import tempfile

import pytest

import security


@pytest.fixture(scope="module")
def daemon():
    work = pathlib.Path(tempfile.mkdtemp(prefix="qlorad-security-"))
    d = security.start(work)
    try:
        yield d
    finally:
        d.close()
        log = d.logs()
        shutil.rmtree(work, ignore_errors=True)
        assert "panicked" not in log, log[-4000:]


def test_inference_keys_are_refused_on_admin_routes(daemon):
    print(security.check_keys(daemon))


def test_path_traversal_in_adapter_names_and_paths(daemon):
    print(security.check_traversal(daemon))


def test_oversized_bodies_get_413(daemon):
    print(security.check_oversized(daemon))


def test_slow_clients_time_out(daemon):
    print(security.check_slow(daemon))
    assert daemon.alive()
