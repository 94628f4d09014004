"""Every bad input of the table (``cases.py``) fails with a clear error and changes no file.

Clear means: the stated exception type, a message that names the offending value and the fix,
and, on the command line, exit status 2 without a traceback. Files: every file of the shared
world (a cache, exports, checkpoints, configs) hashes the same before and after each case, and
no config ran the code it named.
"""

from pathlib import Path

import pytest
from reliability.cases import CASES, PWNED, Case, CLIExit, World, build_world, world_hash


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("world"))


def test_the_table_is_large_and_its_ids_unique():
    assert len(CASES) >= 60
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_fails_clearly_and_writes_nothing(case: Case, world: World, tmp_path: Path):
    before = world_hash(world.root)
    with pytest.raises(Exception) as info:
        case.act(world, tmp_path)
    error = info.value
    assert case.error in [cls.__name__ for cls in type(error).__mro__], repr(error)
    message = str(error)
    for name in case.names:
        assert name in message, f"{name!r} not in {message!r}"
    assert case.fix in message, f"{case.fix!r} not in {message!r}"
    if isinstance(error, CLIExit):
        assert error.code == 2 and "Traceback" not in error.stderr
    assert world_hash(world.root) == before
    assert not (tmp_path / PWNED).exists()  # a config ran the code it named
