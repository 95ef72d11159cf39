"""The trainers' command lines: every front's flags, defaults, choices and types, pinned.

tests/data/trainer_flags.json holds them as they were before the settings moved into
es_llm/config.py (captured from the old hand-written parser); `python tests/test_cli.py` writes it
again.
"""
import json
import os
import sys

import pytest

from conftest import ROOT, load_module

FIXTURE = ROOT / "tests" / "data" / "trainer_flags.json"
# front -> (script, accelerated)
FRONTS = {"conciseness": ("es_fine-tuning_conciseness.py", False),
          "countdown": ("countdown/es_fine-tuning_countdown.py", False),
          "generic": ("es_fine-tuning.py", False),
          "accelerated": ("es_fine-tuning_countdown_accl.py", True)}


def front_parser(front: str):
    """The parser the front builds: from its own constants (the generic front's CONSTANTS)."""
    from es_llm.cli import build_parser

    path, accelerated = FRONTS[front]
    module = load_module(ROOT / path, "front_" + front)
    constants = getattr(module, "CONSTANTS", vars(module))
    return build_parser(module.__doc__, constants, accelerated)


def flag_table(parser) -> dict:
    """dest -> what argparse does with the flag (help texts aside), plus the parsed defaults of
    the settings that are not flags."""
    table = {}
    for action in parser._actions:
        if action.dest == "help":
            continue
        table[action.dest] = {
            "flags": list(action.option_strings), "default": action.default,
            "choices": None if action.choices is None else list(action.choices),
            "type": None if action.type is None else action.type.__name__,
            "action": type(action).__name__, "const": action.const, "nargs": action.nargs,
            "metavar": action.metavar, "required": action.required}
    return {"flags": table, "parsed": vars(parser.parse_args([]))}


def current() -> dict:
    return {front: flag_table(front_parser(front)) for front in FRONTS}


@pytest.mark.parametrize("front", FRONTS)
def test_every_front_keeps_its_flags_defaults_choices_and_types(front):
    from es_llm.config import default_engine

    expected = json.loads(FIXTURE.read_text())[front]
    if front == "accelerated":  # vllm when it is installed, on the machine that runs the test
        expected["flags"]["engine"]["default"] = expected["parsed"]["engine"] = default_engine()
    assert json.loads(json.dumps(flag_table(front_parser(front)))) == expected


def test_editing_a_constant_changes_the_flags_default():
    from es_llm.cli import build_parser

    module = load_module(ROOT / "countdown" / "es_fine-tuning_countdown.py", "front_edited")
    constants = {**vars(module), "SIGMA": 0.002, "DATA_SAMPLE": 50, "do_sample": True}
    args = build_parser(module.__doc__, constants).parse_args([])
    assert (args.sigma, args.data_sample, args.do_sample) == (0.002, 50, True)
    without = {k: v for k, v in constants.items() if k != "DATA_SAMPLE"}
    assert not hasattr(build_parser("", without).parse_args([]), "data_sample")


def test_the_accelerated_front_checks_its_settings_once_with_their_real_values(tmp_path,
                                                                              monkeypatch):
    """One validation, of the config that is trained (the task's name, the run directory), and
    CUDA_VISIBLE_DEVICES set before the run starts; train_accelerated itself checks nothing."""
    from es_llm.config import AcceleratedConfig
    from accelerated import trainer as accelerated

    checked, trained = [], []
    validate = AcceleratedConfig.validate
    monkeypatch.setattr(AcceleratedConfig, "validate", lambda cfg: checked.append(cfg) or
                        validate(cfg))
    monkeypatch.setattr(accelerated, "train_accelerated", lambda cfg, task: trained.append(
        (cfg, task, os.environ.get("CUDA_VISIBLE_DEVICES"))) or 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    script = load_module(ROOT / "es_fine-tuning_countdown_accl.py", "front_once")
    with pytest.raises(SystemExit) as exit_:
        script.main(["--engine", "transformers", "--precision", "fp32", "--data_sample", "8",
                     "--experiment_dir", str(tmp_path), "--run_name", "r", "--cuda_devices", "1"])
    assert exit_.value.code == 0 and len(checked) == 1
    (cfg, task, devices), = trained
    assert cfg is checked[0] and devices == "1"
    assert (cfg.task, cfg.output_dir, len(task.prompts)) == ("countdown", str(tmp_path / "r"), 8)
    assert list(tmp_path.iterdir()) == []  # nothing written before the run


def test_a_bad_accelerated_flag_exits_2_with_every_problem_before_anything_is_written(
        tmp_path, capsys):
    script = load_module(ROOT / "es_fine-tuning_countdown_accl.py", "front_bad")
    with pytest.raises(SystemExit) as exit_:
        script.main(["--engine", "transformers", "--precision", "fp32", "--population_size", "0",
                     "--save_every", "-1", "--experiment_dir", str(tmp_path)])
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and "population_size must be >= 1" in error
    assert "save_every must be >= 0" in error and list(tmp_path.iterdir()) == []


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps(current(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE}")
