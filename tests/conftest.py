from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import LoopThread


@pytest.fixture(scope="session")
def lt() -> Iterator[LoopThread]:
    loop_thread = LoopThread()
    yield loop_thread
    loop_thread.close()
