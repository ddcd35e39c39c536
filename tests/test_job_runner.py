"""The job runner's parts without a model: the one output transaction (a job's folder replaced
whole, or ``segment``'s entries merged into a folder), the serial ``execute`` that raises a
task's own error, and the one failure type."""

from __future__ import annotations

import pytest

from napari_upsample_anything.distributed import TaskFailedError, TaskInputError, TaskOutcome, execute
from napari_upsample_anything.pipeline import JobInputError, JobTaskError, OutputTransaction


def test_a_job_folder_is_replaced_only_on_commit(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("earlier result")
    with OutputTransaction(out) as txn:
        (txn.tmp / "new.txt").write_text("new result")
        assert (out / "old.txt").read_text() == "earlier result"  # still there while writing
        assert txn.tmp.parent == out.parent and txn.tmp.name.startswith(".out.partial-")
        txn.commit()
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old folder left


def test_an_aborted_job_leaves_the_earlier_result_and_no_folders_it_made(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(KeyboardInterrupt):
        with OutputTransaction(out) as txn:
            (txn.tmp / "half.txt").write_text("partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []  # the parents it created are gone too

    out = tmp_path / "kept"
    out.mkdir()
    (out / "old.txt").write_text("earlier result")
    with pytest.raises(RuntimeError, match="boom"):
        with OutputTransaction(out) as txn:
            (txn.tmp / "half.txt").write_text("partial")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
    assert [p.name for p in out.iterdir()] == ["old.txt"]


def test_entries_are_merged_into_a_folder_that_holds_other_outputs(tmp_path):
    """``segment`` writes beside ``run``'s outputs: only its own entries are replaced."""
    out = tmp_path / "img"
    (out / "labels.ome.zarr").mkdir(parents=True)
    (out / "labels.ome.zarr" / "stale").write_text("earlier labels")
    (out / "report.json").write_text("run's report")
    with OutputTransaction(out, entries=("labels.ome.zarr", "probabilities.ome.zarr", "segment.json")) as txn:
        (txn.tmp / "labels.ome.zarr").mkdir()
        (txn.tmp / "labels.ome.zarr" / "fresh").write_text("new labels")
        (txn.tmp / "segment.json").write_text("{}")
        txn.commit()
    assert sorted(p.name for p in out.iterdir()) == ["labels.ome.zarr", "report.json", "segment.json"]
    assert [p.name for p in (out / "labels.ome.zarr").iterdir()] == ["fresh"]
    assert (out / "report.json").read_text() == "run's report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img"]


def test_a_failed_merge_into_a_new_folder_leaves_nothing(tmp_path):
    out = tmp_path / "nested" / "img"
    with pytest.raises(ValueError):
        with OutputTransaction(out, entries=("segment.json",)) as txn:
            (txn.tmp / "segment.json").write_text("{}")
            raise ValueError("bad plane")
    assert list(tmp_path.iterdir()) == []


def _task(x):
    if x == "bad":
        raise ValueError("bad input in task")
    if x == "broken":
        raise RuntimeError("broken task")
    return x * 2


def test_serial_execute_with_raise_errors_propagates_the_tasks_own_error(tmp_path):
    ran = []

    def fn(x):
        ran.append(x)
        return _task(x)

    assert [o.result for o in execute([1, 2], fn, raise_errors=True)] == [2, 4]
    with pytest.raises(ValueError, match="bad input in task"):
        execute([1, "bad", 3], fn, retries=2, raise_errors=True)
    assert ran == [1, 2, 1, "bad"]  # no retry, and the task after it did not run
    with pytest.raises(ValueError, match="serial execution"):
        execute([1], fn, client="local", raise_errors=True)


def test_serial_execute_records_the_exception_and_flags_bad_input():
    outcomes = execute([1, "bad", "broken"], _task, retries=1)
    assert [o.ok for o in outcomes] == [True, False, False]
    assert outcomes[1].input_error and isinstance(outcomes[1].exception, ValueError)
    assert not outcomes[2].input_error and isinstance(outcomes[2].exception, RuntimeError)
    assert "RuntimeError: broken task" in outcomes[2].error


def test_one_failure_type_with_an_input_subtype():
    bad = TaskOutcome(0, "t", False, error="ValueError: x", input_error=True)
    broken = TaskOutcome(1, "u", False, error="RuntimeError: y")
    only_bad = TaskFailedError.of("1 failed", [bad])
    assert type(only_bad) is TaskInputError and isinstance(only_bad, ValueError)
    assert only_bad.failures == [bad] and str(only_bad) == "1 failed"
    mixed = TaskFailedError.of("2 failed", [bad, broken])
    assert type(mixed) is TaskFailedError and not isinstance(mixed, ValueError)
    assert JobTaskError is TaskFailedError and JobInputError is TaskInputError  # the names before #21
