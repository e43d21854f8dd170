"""The sharded row store behind the feature cache (hymtl.store): keys of any file name, newest
rows first, verified reads, concurrent writers, and shards any safetensors reader opens."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from hymtl.store import ShardedStore, StoreError


def test_rows_round_trip_with_keys_of_any_file_name(tmp_path):
    odd = "/data/\udcff\udcfe caf\u00e9 \u2603 \n tab\t.jpg"  # not UTF-8, a newline, a tab: all allowed by the OS
    store = ShardedStore(tmp_path, torch.float32)
    with store.writer() as writer:
        writer.add([odd, 10, 7], torch.arange(6.0).reshape(2, 3), {"file_sha256": "ab"})
        writer.add(["/b.jpg", 1, 1], torch.ones(2, 3))
    reader = ShardedStore(tmp_path, torch.float32)  # another process: only the files
    reader.refresh()
    (row,) = reader.rows((odd, 10, 7))
    assert row.meta == {"file_sha256": "ab"} and row.shape == (2, 3)
    assert torch.equal(reader.read(row), torch.arange(6.0).reshape(2, 3))
    assert reader.rows((odd, 10, 8)) == [] and len(reader) == 2
    (shard,) = tmp_path.glob("*.safetensors")
    assert load_file(str(shard))["rows"].shape == (2, 2, 3)  # a plain safetensors file


def test_a_key_written_again_is_read_from_its_newest_row(tmp_path):
    store = ShardedStore(tmp_path, torch.bfloat16)
    for value in (1.0, 2.0):
        with store.writer() as writer:
            writer.add(["k"], torch.full((4,), value))
    reader = ShardedStore(tmp_path, torch.bfloat16)
    reader.refresh()
    rows = reader.rows(["k"])
    assert len(rows) == 2 and reader.read(rows[0]).tolist() == [2.0] * 4


def test_a_row_of_another_dtype_or_with_flipped_bytes_is_refused(tmp_path):
    with ShardedStore(tmp_path, torch.float32).writer() as writer:
        writer.add(["k"], torch.ones(8))
    (shard,) = tmp_path.glob("*.safetensors")
    other = ShardedStore(tmp_path, torch.bfloat16)
    other.refresh()
    with pytest.raises(StoreError, match="dtype"):
        other.read(other.rows(["k"])[0])
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x10  # inside the tensor's bytes: the file still parses
    shard.write_bytes(bytes(data))
    store = ShardedStore(tmp_path, torch.float32)
    store.refresh()
    with pytest.raises(StoreError, match="checksum"):
        store.read(store.rows(["k"])[0])


def test_a_failed_write_is_logged_once_and_does_not_raise(tmp_path, caplog):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the store's folder should be")
    store = ShardedStore(blocker / "features", torch.float32, flush_seconds=0)
    with caplog.at_level(logging.WARNING, logger="hymtl.store"), store.writer() as writer:
        for i in range(3):
            writer.add([i], torch.ones(2))
    assert caplog.text.count("cannot write to the cache") == 1 and writer.written == 0


def test_writers_in_several_processes_share_one_folder(tmp_path):
    """What DDP ranks and parallel runs do: write at the same time, then read each other's rows."""
    script = textwrap.dedent(f"""
        import sys, torch
        from hymtl.store import ShardedStore
        rank = int(sys.argv[1])
        with ShardedStore({str(tmp_path)!r}, torch.float32, flush_seconds=0).writer() as writer:
            for i in range(rank, 40, 2):
                writer.add([i], torch.full((16,), float(i)))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(rank)]) for rank in range(2)]
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    store = ShardedStore(tmp_path, torch.float32)
    store.refresh()
    assert len(store) == 40 and len(list(tmp_path.glob("*.safetensors"))) == 40
    assert all(store.read(store.rows([i])[0])[0].item() == i for i in range(40))
    assert not list(tmp_path.glob(".*"))  # no temporaries left behind
