"""Progress without a terminal: plain lines with rows, shards, rate and ETA, also between commits."""

from __future__ import annotations

from pipeline.progress import Progress


def test_plain_lines_when_not_a_terminal(capsys):
    bar = Progress(total_rows=100, total_shards=4, done_rows=25, done_shards=1, interval_s=0.0)
    bar.tick()
    bar.commit(25)
    bar.shard_failed()
    bar.commit(50)
    bar.close()
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("progress: 25/100 rows, shards 1/4")
    assert lines[1].startswith("progress: 50/100 rows, shards 2/4")
    assert lines[-1].startswith("progress: 100/100 rows, shards 3/4, 1 failed")
    assert all("rows/s" in line for line in lines)
    assert "ETA" in lines[1]


def test_disabled_progress_prints_nothing(capsys):
    bar = Progress(total_rows=None, total_shards=2, done_rows=0, done_shards=0, enabled=False)
    bar.tick()
    bar.commit(10)
    assert capsys.readouterr().out == ""
