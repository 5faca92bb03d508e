"""A real ComfyUI server with PatchLab and the test kit in custom_nodes, shared by the e2e tests."""

import pytest

from devtools.server import ComfyServer, prepare_base_directory


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    base = prepare_base_directory(tmp_path_factory.mktemp("comfyui"), with_testkit=True)
    # --cache-none: every queued prompt runs every node, so repeated runs really recompute.
    with ComfyServer(base, extra_args=["--cache-none"]) as running:
        yield running


@pytest.fixture(scope="session")
def object_info(server):
    return server.object_info()
