"""plan_increment over plain records: what a run keeps, computes, replaces and retires."""

from __future__ import annotations

from pipeline.increment import plan_increment
from pipeline.listing import InputFile
from pipeline.plan import Sizing, cut_shards

SIZING = Sizing(rows_per_shard=100, bytes_per_shard={"parquet": 10_000})


def big(name: str, version: str = "v1", groups: int = 3) -> InputFile:
    """A Parquet file cut into one shard per 100-row group."""
    return InputFile(f"s3://b/{name}", "parquet", 30_000, version, row_group_rows=[100] * groups)


def small(name: str, version: str = "v1") -> InputFile:
    """A 4 kB file: two or three of them are packed into one shard."""
    return InputFile(f"s3://b/{name}", "parquet", 4_000, version, row_group_rows=[10])


def ids(shards) -> set[str]:
    return {s.id for s in shards}


def test_first_run_computes_everything() -> None:
    files = [big("a"), small("b"), small("c")]
    inc = plan_increment(files, SIZING, [])
    assert ids(inc.shards) == ids(cut_shards(files, SIZING))
    assert inc.kept == [] and inc.files_new == [f.uri for f in files]


def test_unchanged_files_keep_their_shards_and_new_ones_are_cut() -> None:
    before = [big("a"), small("b"), small("c")]
    held = cut_shards(before, SIZING)
    now = [*before, small("d"), big("e", groups=2)]
    inc = plan_increment(now, SIZING, held)
    assert set(inc.kept) == ids(held)
    new = ids(inc.shards) - ids(held)
    assert new == ids(cut_shards([small("d"), big("e", groups=2)], SIZING))
    assert not inc.replaced and not inc.retired
    assert inc.files_new == ["s3://b/d", "s3://b/e"] and inc.files_unchanged == 3


def test_changed_file_replaces_its_shards_and_its_packmates_are_recomputed() -> None:
    before = [big("a"), small("b"), small("c")]
    held = cut_shards(before, SIZING)
    packed = [s for s in held if len(s.pieces) == 2]
    assert packed, "b and c share a shard"
    now = [big("a"), small("b", "v2"), small("c")]
    inc = plan_increment(now, SIZING, held)
    assert inc.replaced == [packed[0].id]
    new = [s for s in inc.shards if s.id not in ids(held)]
    assert {p.uri for s in new for p in s.pieces} == {"s3://b/b", "s3://b/c"}
    assert inc.files_changed == ["s3://b/b"]
    # Every current file's rows are in exactly one shard after the run.
    covered = [(p.uri, p.start) for s in inc.shards for p in s.pieces]
    assert len(covered) == len(set(covered))


def test_deleted_file_is_retired_or_kept() -> None:
    before = [big("a"), big("b", groups=2)]
    held = cut_shards(before, SIZING)
    b_shards = {s.id for s in held if s.pieces[0].uri == "s3://b/b"}
    retire = plan_increment([big("a")], SIZING, held)
    assert set(retire.retired) == b_shards and not retire.replaced
    assert retire.files_deleted == ["s3://b/b"]
    keep = plan_increment([big("a")], SIZING, held, keep_deleted=True)
    assert set(keep.kept) == ids(held) and not keep.retired and not keep.lost_with_deleted


def test_keep_deleted_loses_rows_only_when_packed_with_a_changed_file() -> None:
    before = [small("b"), small("c")]
    held = cut_shards(before, SIZING)
    assert len(held) == 1
    inc = plan_increment([small("c", "v2")], SIZING, held, keep_deleted=True)
    assert inc.replaced == [held[0].id]
    assert inc.lost_with_deleted == ["s3://b/b"]


def test_resumed_run_keeps_the_shards_a_crash_committed() -> None:
    """A split file half committed: cut the same way, its committed shards count as done."""
    files = [big("a", groups=4)]
    planned = cut_shards(files, SIZING)
    committed = planned[:2]
    inc = plan_increment(files, SIZING, committed)
    assert ids(inc.shards) == ids(planned)
    assert not inc.replaced and not inc.retired


def test_recut_after_a_size_change_replaces_the_old_cut() -> None:
    files = [big("a", groups=4)]
    held = cut_shards(files, SIZING)
    bigger = Sizing(rows_per_shard=200, bytes_per_shard={"parquet": 20_000})
    inc = plan_increment(files, bigger, held[:3])  # a crash committed 3 of 4 shards
    assert set(inc.replaced) == ids(held[:3])
    assert ids(inc.shards) == ids(cut_shards(files, bigger))


def test_two_cuts_of_one_file_held_at_once_keep_only_the_current_cut() -> None:
    """rows_per_shard changed and the run died before dropping the old cut: both cuts are
    committed. Only the cut of today's sizing stays; its shards count as done."""
    files = [big("a", groups=4)]
    old = cut_shards(files, SIZING)
    bigger = Sizing(rows_per_shard=200, bytes_per_shard={"parquet": 20_000})
    new = cut_shards(files, bigger)
    for sizing, current in ((bigger, new), (SIZING, old)):  # and reverting the change
        inc = plan_increment(files, sizing, [*old, *new])
        assert ids(inc.shards) == ids(current)
        assert set(inc.replaced) == ids(old + new) - ids(current)
        rows = sorted((p.start, p.end) for s in inc.shards for p in s.pieces)
        step = 200 if current is new else 100
        assert rows == [(a, a + step) for a in range(0, 400, step)]  # each row once
