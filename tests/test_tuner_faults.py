"""Bar 1, faults: `kill -9` of the driver mid-study then `--resume` loses no finished trial; a worker
killed mid-trial makes that trial fail with its cause, and the study goes on with a restarted worker."""
from __future__ import annotations

import os
import signal
import subprocess
import time

from optuna.trial import TrialState

from tuner.recipe import load_recipe
from tuner_helpers import ROOT, kill_group, load_study, read_events, start_driver, tiny_space, wait_for

# every trial runs the PPL check and a speed run (the limit is out of reach, no drafter), over 30 distinct
# knob sets, so TPE seldom proposes a repeat (a repeat reuses a measurement and runs nothing)
SLOW = {"knobs.sliding_window": {"low": 2, "high": 16}, "knobs.batch_size": [1, 2], "knobs.drafter": ["none"],
        "workload.repeats": 2, "workload.output_tokens": 16, "quality": {"ppl_max": 1.0e9}}


def _finished(study_dir, name):
    try:
        study = load_study(study_dir, name)
    except Exception:  # noqa: BLE001 - the study may not exist yet
        return {}
    return {t.number: (t.state, t.values) for t in study.get_trials()
            if t.state in (TrialState.COMPLETE, TrialState.FAIL)}


def test_kill_9_driver_then_resume_loses_no_finished_trial(tmp_path):
    space = tiny_space(tmp_path, **SLOW)
    study_dir, recipe = tmp_path / "run", tmp_path / "recipe.yaml"
    args = ["tiny-gemma4", "--gpu", "cpu", "--trials", "5", "--search-space", str(space), "--study-dir",
            str(study_dir), "--study-name", "k9", "--out", str(recipe)]
    log = tmp_path / "first.log"
    driver = start_driver(args, log)
    try:
        def freeze_a_running_trial():
            """After two finished trials, stop (SIGSTOP) the actor while a trial is in flight, so the driver
            is surely killed mid-trial; if the trial finished first, let it go on and try the next one."""
            events = read_events(study_dir)
            if len(_finished(study_dir, "k9")) < 2 or not events or events[-1]["event"] != "trial_started":
                return None
            os.kill(events[-1]["pid"], signal.SIGSTOP)
            if events[-1]["trial"] in _finished(study_dir, "k9"):
                os.kill(events[-1]["pid"], signal.SIGCONT)
                return None
            return events[-1]
        frozen = wait_for(freeze_a_running_trial, 240, "two finished trials and a third running", driver, log)
        os.kill(driver.pid, signal.SIGKILL)  # the driver only: no clean-up code of ours runs
        driver.wait(timeout=30)
    finally:
        kill_group(driver)  # then what it left behind (its local Ray cluster)
    before = _finished(study_dir, "k9")
    assert 2 <= len(before) < 5 and not recipe.exists()

    log2 = tmp_path / "resume.log"
    resumed = subprocess.run(["python", "-m", "tuner.cli", *args, "--resume"], cwd=ROOT, capture_output=True,
                             text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    log2.write_text(resumed.stdout + resumed.stderr)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = load_study(study_dir, "k9").get_trials()
    for number, (state, values) in before.items():  # nothing that had finished changed or vanished
        assert after[number].state == state and after[number].values == values
    interrupted = [t for t in after if t.user_attrs.get("cause") == "interrupted"]
    # the trial that was running when the driver died (unless its result reached storage just before)
    assert [t.number for t in interrupted] == ([] if frozen["trial"] in before else [frozen["trial"]])
    for t in interrupted:  # a trial running at the kill is failed and its knobs run again
        assert t.state == TrialState.FAIL
        assert any(u.user_attrs.get("requeued_from") == t.number and u.state == TrialState.COMPLETE for u in after)
    counted = [t for t in after if t.state in (TrialState.COMPLETE, TrialState.FAIL) and t not in interrupted]
    assert len(counted) == 5 and all(t.state == TrialState.COMPLETE for t in counted)
    assert load_recipe(recipe).study.trials_total == len(after)
    assert f"({len(before)} trials so far)" in resumed.stderr and "re-queued" in resumed.stderr


def test_worker_killed_mid_trial_fails_that_trial_and_study_goes_on(tmp_path):
    # trials of several seconds: the kill must land while trial 0 is still running, also on a fast machine
    space = tiny_space(tmp_path, **{**SLOW, "workload.output_tokens": 256, "workload.repeats": 3})
    study_dir, recipe = tmp_path / "run", tmp_path / "recipe.yaml"
    log = tmp_path / "driver.log"
    driver = start_driver(["tiny-gemma4", "--gpu", "cpu", "--trials", "3", "--search-space", str(space),
                           "--study-dir", str(study_dir), "--study-name", "wk", "--out", str(recipe)], log)
    try:
        started = wait_for(lambda: [e for e in read_events(study_dir) if e["event"] == "trial_started"], 240,
                           "the first trial to start", driver, log)[0]
        time.sleep(0.3)
        os.kill(started["pid"], signal.SIGKILL)  # the Ray actor process running trial 0
        assert driver.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        kill_group(driver)
    trials = load_study(study_dir, "wk").get_trials()
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs["cause"] == "crash", trials[0].user_attrs
    assert "died" in trials[0].user_attrs["error"]
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials[1:])
    events = read_events(study_dir)
    later_pids = {e["pid"] for e in events if e["event"] == "trial_started" and e["trial"] > 0}
    assert later_pids and started["pid"] not in later_pids  # the next trials ran on a restarted actor
    text = log.read_text()
    assert "trial 0 failed (crash)" in text and "restarting slot 0" in text
    assert load_recipe(recipe).study.trial_number in (1, 2)


def test_trials_past_their_time_limit_fail_as_timeout_and_a_failing_worker_is_retired(tmp_path, capsys):
    from tuner.cli import main

    space = tiny_space(tmp_path, **SLOW)
    code = main(["tiny-gemma4", "--gpu", "cpu", "--trials", "4", "--search-space", str(space), "--study-dir",
                 str(tmp_path / "run"), "--study-name", "to", "--ppl-max", "1e9", "--trial-timeout", "0.01"])
    err = capsys.readouterr().err
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("vkae-tune: error: every worker was taken out of the pool") and "timeout" in last
    trials = load_study(tmp_path / "run", "to").get_trials()
    assert [t.user_attrs.get("cause") for t in trials] == ["timeout"] * 3
    assert all(t.state == TrialState.FAIL for t in trials)
    assert err.count("worker pool: restarting slot 0") == 2 and "worker pool: retired slot 0" in err
