"""The random walk of tests/cluster/fsmodel.py on a local file system: what
its model expects is what Linux does (a walk that found a difference on
the DRVM file system is then the DRVM file system's)."""

import pytest

from tests.cluster.fsmodel import Mismatch, Walk


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_model_is_what_a_local_file_system_does(tmp_path, seed):
    Walk([str(tmp_path), str(tmp_path)], seed).run(3000)


def test_a_walk_reports_what_a_file_system_got_wrong(tmp_path):
    """A view that is not the same directory: the first look that differs fails the walk."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(Mismatch, match="after .* operations"):
        Walk([str(tmp_path / "a"), str(tmp_path / "b")], 0).run(3000)
