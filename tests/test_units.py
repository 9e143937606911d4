import pytest

from drvs.errors import UsageError
from drvs.units import format_size, parse_cpus, parse_cpuset, parse_memory, parse_size


@pytest.mark.parametrize("text,value", [
    ("100", 100), ("64k", 65536), ("512M", 512 << 20), ("1.5g", 3 << 29), ("2GiB", 2 << 30), ("1t", 1 << 40)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "12Q", "-5M", "M", "0", "1..2G"])
def test_parse_size_rejects(text):
    with pytest.raises(UsageError, match="invalid size"):
        parse_size(text)


def test_a_memory_limit_too_small_to_start_a_cell_is_refused():
    assert parse_memory("6M") == 6 << 20
    for text in ("1", "1k", "5M"):
        with pytest.raises(UsageError, match="must be at least 6M"):
            parse_memory(text)


def test_format_size_round_trips_common_limits():
    assert format_size(512 << 20) == "512M"
    assert format_size(None) == "-"


def test_cpus_and_cpusets():
    assert parse_cpus("0.5") == 0.5
    with pytest.raises(UsageError):
        parse_cpus("zero")
    with pytest.raises(UsageError):
        parse_cpus("0")
    assert parse_cpuset("0,2-3") == "0,2-3"
    with pytest.raises(UsageError):
        parse_cpuset("0-")


def test_cpuset_text_spells_runs_as_ranges():
    from drvs.units import cpuset_ids, cpuset_text

    assert cpuset_text({7, 2, 3, 4, 5, 9}) == "2-5,7,9"
    assert cpuset_text(set()) == "" and cpuset_text({0}) == "0"
    assert cpuset_ids(cpuset_text(set(range(2, 100)))) == set(range(2, 100))


def test_a_share_change_sets_what_it_names_and_clears_what_it_says_none():
    from drvs.vm.model import Limits, changed_share, parse_share_change

    node, change = parse_share_change("n2:cpus=2,memory=none")
    assert (node, change) == ("n2", (Limits(cpus=2.0), frozenset({"memory"})))
    old = Limits(cpus=1.0, memory=256 << 20, pids=100)
    assert changed_share(old, *change) == Limits(cpus=2.0, pids=100)
    assert changed_share(None, *parse_share_change("n3:memory=1G")[1]) == Limits(memory=1 << 30)
    assert changed_share(old, *parse_share_change("n2")[1]) == old
    for bad, why in (("n2:memory=none,memory=1G", "memory given twice"), ("n2:swap=none", "expected NODE:"),
                     ("n2:memory=nonsense", "invalid")):
        with pytest.raises(UsageError, match=why):
            parse_share_change(bad)


def test_a_duration_is_seconds_minutes_or_hours_and_a_definition_keeps_it():
    from drvs.units import format_duration, parse_duration
    from drvs.vm.model import FS_REPLACE_AFTER, VmSpec

    assert [parse_duration(t) for t in ("90", "90s", "5m", "1.5h", "0")] == [90, 90, 300, 5400, 0]
    assert [format_duration(s) for s in (90, 300, 5400, 0, 2.5)] == ["90s", "5m", "90m", "0s", "2.5s"]
    for bad in ("soon", "-1", "5d", "2 weeks", "10000h"):
        with pytest.raises(UsageError, match="invalid duration"):
            parse_duration(bad)
    spec = VmSpec("web", shares={}, fs_nodes=["n1"], fs_replace_after=2.0)
    assert VmSpec.from_json(spec.to_json()).replace_after() == 2.0
    old = '{"name": "web", "shares": {}, "fs_nodes": ["n1"]}'  # (stored before the setting was)
    assert VmSpec.from_json(old).fs_replace_after is None and VmSpec.from_json(old).replace_after() == FS_REPLACE_AFTER
