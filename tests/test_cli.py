"""The trainers' command lines: every front's flags, defaults, choices and types, pinned.

tests/data/trainer_flags.json holds them as they were before the settings moved into es_llm/config.py
(captured from the old hand-written parser); `python tests/test_cli.py` writes it again.
"""
import json
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


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps(current(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE}")
