import pytest

from tests.gateway_process import Gateway


def _gateway_factory():
    started: list[Gateway] = []

    def start(config, env=None) -> Gateway:
        gw = Gateway(config, env)
        started.append(gw)
        return gw

    return started, start


@pytest.fixture
def make_gateway():
    """Start gateways on free ports; stop every one (and check its children are gone) at the end."""
    started, start = _gateway_factory()
    yield start
    for gw in started:
        gw.stop()


@pytest.fixture(scope="module")
def make_module_gateway():
    """Like ``make_gateway``, but the gateways live until the test module ends (one per module)."""
    started, start = _gateway_factory()
    yield start
    for gw in started:
        gw.stop()

