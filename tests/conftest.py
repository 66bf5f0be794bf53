import pytest

from tests.gateway_process import Gateway


@pytest.fixture
def make_gateway():
    """Start gateways on free ports; stop every one (and check its children are gone) at the end."""
    started: list[Gateway] = []

    def start(config, env=None) -> Gateway:
        gw = Gateway(config, env)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()
