"""Fast tuner tests without Ray or a model: search-space validation, profiles, recipes, the front."""
from __future__ import annotations

import math

import pytest
import yaml

from tuner import recipe as R
from tuner.cli import main
from tuner.errors import GpuMismatchError, RecipeError, SearchSpaceError
from tuner.pareto import TrialPoint, choose, pareto_front
from tuner.profiles import PROFILES, check_device, identify
from tuner.search_space import load_search_space, parse_search_space, shipped_search_spaces
from tuner.workload import text_to_records

GOOD = """\
model: tiny-gemma4
random_weights: true
knobs:
  sliding_window: [null, 8]
  batch_size: {low: 1, high: 4}
workload:
  prompts: {path: data/tinystories_prompts.txt}
  output_tokens: 8
  ppl_records: {synthetic: {count: 4, context_tokens: 8, target_tokens: 8}}
quality:
  ppl_max_ratio: 1.1
"""


def test_shipped_search_spaces_validate():
    names = {p.stem for p in shipped_search_spaces()}
    assert {"gemma-4-e4b", "gemma-4-e2b", "gemma-3-270m", "tiny-gemma4", "tiny-gemma3"} <= names
    for path in shipped_search_spaces():
        load_search_space(path)
    assert load_search_space([p for p in shipped_search_spaces() if p.stem == "gemma-4-e4b"][0]).quality.ppl_max == 2.42


@pytest.mark.parametrize("old,new,line,field", [
    ("high: 4", "high: 0", 5, "knobs.batch_size"),
    ("[null, 8]", "[null, eight]", 4, "knobs.sliding_window.1"),
    ("output_tokens: 8", "output_tokens: -3", 8, "workload.output_tokens"),
    ("  prompts:", "  promts:", 7, "workload.promts"),
    ("ppl_max_ratio: 1.1", "ppl_max_ratio: 1.1\n  ppl_max: 2.0", 10, "quality"),
])
def test_bad_search_space_names_field_and_line(old, new, line, field):
    with pytest.raises(SearchSpaceError) as info:
        parse_search_space(GOOD.replace(old, new), "bad.yaml")
    message = str(info.value)
    assert message.startswith(f"bad.yaml:{line}: {field}:"), message


def test_bad_search_space_through_cli_is_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(GOOD.replace("output_tokens: 8", "output_tokens: lots"))
    code = main(["tiny-gemma4", "--gpu", "cpu", "--search-space", str(path), "--study-dir", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{path}:8: workload.output_tokens:" in err


def test_invalid_yaml_syntax_gives_line(tmp_path):
    with pytest.raises(SearchSpaceError, match=r"^x.yaml:3: not valid YAML"):
        parse_search_space("model: a\nknobs:\n\tbatch_size: [1]\n", "x.yaml")


def test_gpu_profiles_recognise_cards_and_reject_mismatch():
    assert identify("NVIDIA A10G") == "a10g"
    assert identify("NVIDIA L4") == "l4" and identify("NVIDIA L40S") == "l40s"
    assert identify("NVIDIA H100 80GB HBM3") == "h100" and identify("NVIDIA A100-SXM4-80GB") == "a100"
    assert identify("cpu") == "cpu" and identify("Some GPU") is None
    assert check_device(PROFILES["cpu"], {"gpu_name": "cpu"}, False) is None
    with pytest.raises(GpuMismatchError, match="--allow-gpu-mismatch"):
        check_device(PROFILES["a10g"], {"gpu_name": "NVIDIA H100 80GB HBM3"}, False)
    assert "continuing" in check_device(PROFILES["a10g"], {"gpu_name": "NVIDIA L4"}, True)


def test_text_to_records_cuts_equal_records():
    recs = text_to_records(list(range(100, 130)), context_tokens=4, target_tokens=3, bos_id=2)
    assert len(recs) == 30 // 7
    assert recs[0] == {"context_token_ids": [2, 100, 101, 102, 103], "target_token_ids": [104, 105, 106]}
    assert recs[1]["context_token_ids"][1] == 107
    assert len(text_to_records(list(range(100)), 4, 3, 2, count=2)) == 2


def test_pareto_front_and_choice():
    pts = [TrialPoint(0, "complete", True, 10.0, 2.0, knobs={"a": 0}), TrialPoint(1, "complete", True, 20.0, 2.3, knobs={"a": 2}),
           TrialPoint(2, "complete", True, 15.0, 2.4, knobs={"a": 3}),  # dominated by 1
           TrialPoint(3, "complete", False, 50.0, 3.0, knobs={"a": 4}),  # infeasible
           TrialPoint(4, "failed", False, None, None), TrialPoint(5, "complete", True, 5.0, 1.9, knobs={"a": 1}),
           TrialPoint(6, "complete", True, 5.0, 1.9, knobs={"a": 1})]  # 6 repeats 5's knobs
    front = pareto_front(pts)
    assert [p.number for p in front] == [1, 0, 5]
    assert choose(front).number == 1
    assert choose(pareto_front([p for p in pts if not p.feasible])) is None


def _recipe() -> R.Recipe:
    return R.Recipe(
        model=R.ModelRef(reference="m", name="m", weights={"model.safetensors": "ab" * 32}),
        assistant=None, engine=R.EngineRef(version="0.1.0", git_commit="c" * 40, git_dirty=False),
        hardware=R.Hardware(gpu_profile="cpu", gpu_profile_matched=True, gpu_name="cpu", device="cpu", torch="2"),
        knobs={"sliding_window": 128, "batch_size": 1},
        metrics=R.Metrics(tps=R.Metric(value=100.5, min=99.0, max=101.0), tps_per_stream=100.5, ppl=2.3, ppl_tokens=10),
        workload=R.WorkloadRef(prompts={"sha256": "1" * 64}, ppl_records={"sha256": "2" * 64}, token_sha256="3" * 64,
                               output_tokens=8, batch_size=1, repeats=2, warmup=1),
        quality_limit=R.QualityLimit(kind="ppl_max", value=2.42, baseline_ppl=None, ppl_limit=2.42),
        pareto_front=[R.FrontPoint(trial_number=3, knobs={"sliding_window": 128}, tps=100.5, tps_per_stream=100.5, ppl=2.3)],
        study=R.StudyRef(name="s", trial_number=3, trials_total=4, trials_feasible=2, search_space=None,
                         search_space_sha256=None, created_utc="2026-01-01T00:00:00Z"))


def test_recipe_round_trip_and_tamper(tmp_path):
    path = R.write_recipe(_recipe(), tmp_path / "r.yaml")
    loaded = R.load_recipe(path)
    assert loaded.metrics.tps.value == 100.5 and len(loaded.content_sha256) == 64
    assert loaded.content_sha256 == loaded.compute_hash()
    with pytest.raises(Exception):  # frozen: a recipe object cannot be edited either
        loaded.knobs = {}
    text = path.read_text()
    (tmp_path / "t.yaml").write_text(text.replace("value: 100.5", "value: 150.5"))
    with pytest.raises(RecipeError, match="content hash mismatch"):
        R.load_recipe(tmp_path / "t.yaml")
    data = yaml.safe_load(text)
    data["knobs"]["unknown_knob"] = 1
    (tmp_path / "u.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError, match="content hash mismatch"):
        R.load_recipe(tmp_path / "u.yaml")
    del data["metrics"]
    (tmp_path / "v.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError, match="metrics: Field required"):
        R.load_recipe(tmp_path / "v.yaml")
    assert math.isclose(R.load_recipe(path).quality_limit.ppl_limit, 2.42)


def test_models_command_lists_aliases_and_profiles(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "tiny-gemma4" in out and "gemma-3-270m" in out and "search_spaces/gemma-4-e4b.yaml" in out
    for name in PROFILES:
        assert f"  {name} " in out


def test_unknown_gpu_profile_is_user_error(capsys):
    assert main(["tiny-gemma4", "--gpu", "v100"]) == 2
    assert "unknown GPU profile" in capsys.readouterr().err
