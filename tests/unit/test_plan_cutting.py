"""Splitting and coalescing as plain functions over file records: no storage needed."""

from __future__ import annotations

from pipeline.listing import InputFile
from pipeline.plan import Sizing, coalesce, cut_file, cut_shards, measure_sizing


def parquet(name: str, size: int, groups: list[int] | None = None, version: str = "v1") -> InputFile:
    return InputFile(f"s3://b/{name}", "parquet", size, version, row_group_rows=groups)


def ranges_of(shards) -> list[tuple[int, int]]:
    return [(p.start, p.end) for s in shards for p in s.pieces]


SIZING = Sizing(rows_per_shard=1000, bytes_per_shard={"parquet": 10_000, "csv": 10_000,
                                                      "jsonl": 10_000, "ipc": 10_000})


def test_a_huge_row_group_is_split_into_row_ranges():
    shards = cut_file(parquet("big.parquet", 1_000_000, [4500]), SIZING)
    assert ranges_of(shards) == [(0, 900), (900, 1800), (1800, 2700), (2700, 3600), (3600, 4500)]
    assert all(s.rows == 900 and len(s.pieces) == 1 for s in shards)
    assert len({s.id for s in shards}) == 5


def test_small_row_groups_are_joined_and_big_ones_split_in_one_file():
    shards = cut_file(parquet("mixed.parquet", 1_000_000, [400, 400, 400, 2500, 100]), SIZING)
    assert ranges_of(shards) == [(0, 1200), (1200, 2033), (2033, 2866), (2866, 3700), (3700, 3800)]
    assert sum(s.rows for s in shards) == 3800


def test_small_files_are_packed_in_path_order_up_to_the_byte_target():
    files = [parquet(f"f{i:03d}.parquet", 1_000) for i in range(25)]
    shards = cut_shards(files, SIZING)
    assert [len(s.pieces) for s in shards] == [10, 10, 5]
    assert [p.uri for s in shards for p in s.pieces] == [f.uri for f in files]
    assert all(s.rows is None for s in shards)  # footers not read: rows unknown
    assert shards[0].uri == "s3://b/f000.parquet (+9 more files)"


def test_shard_ids_are_stable_and_follow_file_versions():
    files = [parquet(f"f{i}.parquet", 3_000) for i in range(6)]
    first = [s.id for s in cut_shards(files, SIZING)]
    assert first == [s.id for s in cut_shards(list(files), SIZING)]
    files[4] = parquet("f4.parquet", 3_000, version="v2")  # replaced: same size, new version
    second = [s.id for s in cut_shards(files, SIZING)]
    assert second[0] == first[0] and second[1] != first[1]


def test_large_text_files_split_by_byte_ranges_and_compressed_ones_whole():
    csv = InputFile("s3://b/big.csv", "csv", 35_000, "e1")
    shards = cut_file(csv, SIZING)
    assert [(p.kind, p.start, p.end) for s in shards for p in s.pieces] == [
        ("bytes", 0, 8750), ("bytes", 8750, 17500), ("bytes", 17500, 26250),
        ("bytes", 26250, 35000)]
    gz = InputFile("s3://b/big.csv.gz", "csv", 35_000, "e1")
    assert [p.kind for s in cut_file(gz, SIZING) for p in s.pieces] == ["file"]


def test_ipc_files_split_by_record_batches():
    ipc = InputFile("s3://b/big.arrow", "ipc", 40_000, "e1", num_batches=8)
    shards = cut_file(ipc, SIZING)
    assert [(p.kind, p.start, p.end) for s in shards for p in s.pieces] == [
        ("batches", 0, 2), ("batches", 2, 4), ("batches", 4, 6), ("batches", 6, 8)]


def test_empty_and_unreadable_files_still_get_a_shard():
    [empty] = cut_file(parquet("empty.parquet", 500, []), SIZING)
    assert empty.rows == 0
    broken = InputFile("s3://b/x.parquet", "parquet", 50_000, "e", error="unreadable")
    [bad] = cut_file(broken, SIZING)
    assert bad.error == "unreadable"


def test_byte_target_comes_from_rows_per_shard_and_the_sampled_row_size():
    sample = parquet("a.parquet", 10_000, [100])
    sample.bytes_per_row = 100.0
    sizing = measure_sizing([sample, parquet("b.parquet", 5)], rows_per_shard=50,
                            bytes_per_shard=None)
    assert sizing.target_bytes("parquet") == 5_000
    assert measure_sizing([sample], 50, bytes_per_shard=123).target_bytes("parquet") == 123


def test_coalesce_mixes_formats_by_their_own_targets():
    files = [InputFile(f"s3://b/{i}.jsonl", "jsonl", 6_000, "e") for i in range(3)]
    assert [len(s.pieces) for s in coalesce(files, SIZING)] == [2, 1]
