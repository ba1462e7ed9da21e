"""The example handler on CI's sample callbacks, by the dispatcher's own rules: the test
kit that ships with ci-receiver (`receiver.testing`), no server needed."""

from ci_receiver_failed_jobs import FailedJobs

from receiver.testing import SAMPLES, many, run_handler, sample


async def test_a_failed_job_gets_a_note(tmp_path):
    failed = sample("transcode-failed")
    [run] = await run_handler(FailedJobs({"folder": tmp_path}), failed)
    assert run.outcome == "done"
    note = (tmp_path / f"{failed.job_id}.txt").read_text()
    assert note == f"Transcode Failed: {failed.code} {failed.message}\n"


async def test_a_cancelled_job_too_and_a_success_not(tmp_path, ci_sample):
    handler = FailedJobs({"folder": tmp_path})
    cancelled, done = ci_sample("transcode-cancelled"), ci_sample("smartcover")
    runs = await run_handler(handler, cancelled, done)
    assert [run.outcome for run in runs] == ["done", "done"]
    assert [p.name for p in tmp_path.iterdir()] == [f"{cancelled.job_id}.txt"]


async def test_every_sample_is_handled(tmp_path):
    runs = await run_handler(FailedJobs({"folder": tmp_path}), *(sample(n) for n in SAMPLES))
    assert {run.outcome for run in runs} == {"done"}


async def test_a_note_that_cannot_be_written_is_retried_then_dead_lettered(tmp_path):
    [failed] = many("transcode-failed", 1)
    (tmp_path / f"{failed.job_id}.txt").mkdir()  # a folder where the note should go
    [run] = await run_handler(FailedJobs({"folder": tmp_path}), failed, attempts=2)
    assert [attempt.outcome for attempt in run.attempts] == ["retry", "dead"]
    assert run.errors[0].startswith("IsADirectoryError")
