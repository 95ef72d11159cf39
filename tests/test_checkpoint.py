"""A saved run (es_llm/checkpoint.py): atomic saves, and finding, reading and checking checkpoints."""
import errno

import pytest

from conftest import fake_checkpoint
from es_llm import checkpoint as ckpt


def resume(path, iterations=10):
    return ckpt.load_resume(path, lambda saved: [], iterations)


def test_atomic_writes_a_file_or_a_directory_whole_or_not_at_all(tmp_path):
    with ckpt.atomic(tmp_path / "state.json") as tmp:
        assert tmp.name == ".state.json.tmp"
        tmp.write_text("one")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "old").write_text("old")
    with ckpt.atomic(tmp_path / "model") as tmp:  # an existing directory is replaced whole
        tmp.mkdir()
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "state.json"]
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["new"]
    with pytest.raises(ckpt.WriteError, match=r"could not write .*model \(OSError: No space left "
                                              r"on device\)"):
        with ckpt.atomic(tmp_path / "model") as tmp:
            tmp.mkdir()
            (tmp / "half").write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "state.json"]
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["new"]  # the last whole copy
    with ckpt.atomic(tmp_path / "cache", unique=True) as tmp:
        assert tmp.name.startswith(".cache.tmp") and tmp.name != ".cache.tmp"
        tmp.write_text("x")


def test_a_truncated_checkpoint_is_named_with_the_earlier_one(tmp_path):
    run = tmp_path / "run"
    fake_checkpoint(run, 1)
    latest = fake_checkpoint(run, 2)
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.check_readable(resume(run)["checkpoint"])
    message = str(error.value)
    assert str(weights) in message and f"--resume {run / 'checkpoint-1'}" in message
    assert "Nothing was written" in message

    alone = tmp_path / "alone"
    only = fake_checkpoint(alone, 1)
    (only / "model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(ckpt.CheckpointError, match="no other checkpoint"):
        ckpt.check_readable(only)


def test_a_broken_state_file_is_named(tmp_path):
    checkpoint = fake_checkpoint(tmp_path / "run", 1)
    (checkpoint / ckpt.STATE_FILE).write_text('{"iteration": 1, "fini')
    with pytest.raises(ValueError, match=str(checkpoint / ckpt.STATE_FILE)):
        resume(checkpoint)
