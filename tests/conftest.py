from __future__ import annotations

from collections.abc import Iterator

import pytest

from medcourier.channels.mllp.simulator import EhrSimulator
from tests import cda_judge
from tests.harness import LoopThread


@pytest.fixture(scope="session")
def lt() -> Iterator[LoopThread]:
    loop_thread = LoopThread()
    yield loop_thread
    loop_thread.close()


@pytest.fixture(scope="session")
def judge() -> cda_judge.Judge:
    """The CI-SIS CDA judge, in this process (see tests/cda_judge.py)."""
    return cda_judge.in_process()


@pytest.fixture
def hospa(lt: LoopThread) -> Iterator[EhrSimulator]:
    """A second EHR simulator, for HOSPA's route (the MLLP inbound and journal tests)."""
    ehr = EhrSimulator()
    lt.run(ehr.start())
    yield ehr
    lt.run(ehr.stop())
