from collections.abc import AsyncIterator

import pytest

from tests.app.inprocess import InProcessCluster, in_process_cluster


@pytest.fixture
async def cluster() -> AsyncIterator[InProcessCluster]:
    async with in_process_cluster() as c:
        yield c
