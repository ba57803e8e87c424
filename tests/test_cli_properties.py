"""The command line's contract, driven by generated input (hypothesis): every run of generate, eval, train
(a few steps) and convert either exits 0 with a valid output, or exits 2 with exactly one line on stderr and
nothing written. Values mix the valid with NaN, infinities, negatives, zero, huge numbers, empty and
non-ASCII strings and missing files. The fast suite draws a few examples per command; `pytest -m slow`
draws many more.

Valid values are kept cheap on purpose (a tiny model, a few steps, one prompt per category): the property
is about where input is refused, not about long runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import pytest
from conftest import tiny_config_dict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from omnidit.cli import main

FAST, SLOW = 6, 60  # examples per command

FLOATS = st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1", "2.5", "1e308", "1e-320", "x", "", "３"])
COUNTS = st.sampled_from(["-1", "0", "1", "2", "1.5", "99999999999999999999", "two", "", "٣"])
TEXT = st.one_of(st.sampled_from(["a red circle", "", " ", "a purple hexagon", "un cercle rouge 🔴",
                                  "a red circle " * 60]), st.text(max_size=30))


def optional(flag: str, values: st.SearchStrategy) -> st.SearchStrategy:
    """[] or [flag, value]."""
    return st.one_of(st.just([]), values.map(lambda v: [flag, v]))


def argv_of(parts: list[st.SearchStrategy]) -> st.SearchStrategy:
    """One argv from strategies that each draw a list of arguments (a flag and its value, or nothing)."""
    return st.tuples(*parts).map(lambda xs: [a for x in xs for a in x])


def run_cli(argv: list[str], folder: Path) -> tuple[int, str, set[str]]:
    """Run the command line inside ``folder``; returns (exit code, stderr, the paths it created there)."""
    before = {str(p) for p in folder.rglob("*")}
    err = io.StringIO()
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    finally:
        os.chdir(cwd)
    return code, err.getvalue(), {str(p) for p in folder.rglob("*")} - before


def assert_contract(code: int, err: str, created: set[str], argv: list[str]) -> None:
    assert code in (0, 2), (argv, code, err)
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("omnidit: error: "), (argv, err)
        assert not created, (argv, created)


@contextlib.contextmanager
def scratch():
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "given.png").write_bytes(b"not an image")
        yield Path(d)


def generate_args(model: str) -> st.SearchStrategy:
    parts = [
        st.just(["generate"]), TEXT.map(lambda t: [t]),
        st.sampled_from([["--model", model]] * 4 + [["--model", "missing"], ["--model", "given.png"]]),
        st.sampled_from([["--steps", "1"], ["--steps", "2"]] * 3 + [["--steps", "0"], ["--steps", "100000"]]),
        optional("--cfg", FLOATS), optional("--shift", FLOATS), optional("--skip-scale", FLOATS),
        optional("--seed", st.sampled_from(["-2", "-1", "0", "7", str(2**63), "", "x"])),
        optional("--size", st.sampled_from(["16x16", "32x16", "0x16", "15x16", "16x", "x", "", "１６x16",
                                            "100000x100000", "-16x16", "16x16x16"])),
        optional("-n", COUNTS), optional("--batch-size", COUNTS), optional("--scale", COUNTS),
        optional("--candidates", COUNTS), optional("--sampler", st.sampled_from(["euler", "heun", "dpm", ""])),
        optional("-o", st.sampled_from(["out.png", "o_{i}.png", "out.jpg", "missing/out.png", ".", "", "o_{j}.png",
                                        "ü.png"])),
        optional("--frames", COUNTS), optional("--image", st.sampled_from(["given.png", "missing.png"])),
        optional("--device", st.sampled_from(["cpu", "auto", "cuda", "tpu", ""])),
        st.sampled_from([["--no-progress"], []]), st.sampled_from([["--no-ema"], []]),
    ]
    return argv_of(parts)


def check_generate(argv: list[str]) -> None:
    with scratch() as folder:
        code, err, created = run_cli(argv, folder)
        assert_contract(code, err, created, argv)
        if code == 0:
            images = [p for p in created if p.endswith(".png")]
            assert images, (argv, created)
            for path in images:
                with Image.open(path) as im:
                    assert im.size[0] >= 16 and im.size[1] >= 16


def train_args(config: str) -> st.SearchStrategy:
    override = st.sampled_from([
        "train.steps=1", "train.steps=2", "train.steps=0", "train.steps=-1", "train.steps=NaN", "train.steps=1.5",
        "train.batch_size=2", "train.batch_size=0", "train.batch_size=x", "train.lr=1e-3", "train.lr=0",
        "train.lr=NaN", "train.lr=Infinity", "train.lr=-1", "train.ema_decay=1.5", "train.warmup_steps=-1",
        "data.width=15", "data.width=0", "data.width=-16", "data.name=nothing", "model.depth=0", "text.max_length=0",
        "train.given_p=2", "train.t_shift=0", "sample.cfg=NaN", "sample.steps=0", "train.bogus=1", "nosection",
        "train.checkpoint_every=1", "train.seed=-5", "data.fps=0", "data.frames=0", "train.out_dir=",
    ])
    config_arg = st.sampled_from([config] * 4 + ["missing.json", "given.png"])
    return st.tuples(config_arg, st.lists(override, max_size=3)).map(
        lambda x: ["train", x[0], "train.steps=1", "train.batch_size=2", *x[1], "--no-progress"])


def check_train(argv: list[str]) -> None:
    with scratch() as folder:
        code, err, created = run_cli(argv, folder)
        assert_contract(code, err, created, argv)
        if code == 0:
            assert any(p.endswith("model.safetensors") for p in created), (argv, created)


def eval_args(model: str) -> st.SearchStrategy:
    parts = [
        st.just(["eval"]), st.sampled_from([[model]] * 4 + [["missing"], ["given.png"]]),
        st.sampled_from([["--limit", "1"]] * 4 + [["--limit", "0"], ["--limit", "-3"]]),
        st.sampled_from([["--n-per-prompt", "1"]] * 4 + [["--n-per-prompt", "0"], ["--n-per-prompt", "x"]]),
        st.sampled_from([["--steps", "1"]] * 4 + [["--steps", "0"], ["--steps", "-1"]]),
        optional("--suite", st.sampled_from(["shapes", "digits", "video", "audio"])),
        optional("--cfg", FLOATS), optional("--seed", st.sampled_from(["-1", "0", "3", "x"])),
        optional("--batch-size", COUNTS), optional("--json", st.sampled_from(["r.json", "missing/r.json", "."])),
        optional("--grid", st.sampled_from(["g.png", "missing/g.png", "g.jpg"])),
        st.just(["--no-fd", "--no-progress"]),
    ]
    return argv_of(parts)


def check_eval(argv: list[str]) -> None:
    with scratch() as folder:
        code, err, created = run_cli(argv, folder)
        assert_contract(code, err, created, argv)
        for path in created:
            if path.endswith(".json"):
                assert "overall" in json.loads(Path(path).read_text())


def convert_args(model: str) -> st.SearchStrategy:
    parts = [
        st.just(["convert"]), st.sampled_from([[model]] * 3 + [["missing"], ["given.png"], [""]]),
        st.sampled_from([["out"]] * 3 + [["missing/out"], ["given.png"], ["."], [""]]),
        optional("--to", st.sampled_from(["diffusers", "omnidit", "onnx"])),
        optional("--family", st.sampled_from(["auto", "flux", "sd3", "dit", "unet"])),
        st.sampled_from([["--no-ema"], []]),
    ]
    return argv_of(parts)


def check_convert(argv: list[str]) -> None:
    with scratch() as folder:
        code, err, created = run_cli(argv, folder)
        assert_contract(code, err, created, argv)
        if code == 0:
            assert any(p.endswith(".safetensors") for p in created), (argv, created)


COMMANDS = {"generate": (generate_args, check_generate), "train": (None, check_train),
            "eval": (eval_args, check_eval), "convert": (convert_args, check_convert)}


def _property(command: str, examples: int, source: str):
    make, check = COMMANDS[command]

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def run(data):
        check(data.draw(make(source) if make is not None else train_args(source)))

    run()


@pytest.fixture(scope="module")
def train_config(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("props") / "tiny.json"
    path.write_text(json.dumps(tiny_config_dict("run")))  # out_dir relative: inside each example's folder
    return str(path)


@pytest.mark.parametrize("command", ["generate", "eval", "convert"])
def test_command_line_contract(command, tiny_run):
    _property(command, FAST, str(tiny_run))


def test_train_command_line_contract(train_config):
    _property("train", FAST, train_config)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["generate", "eval", "convert"])
def test_command_line_contract_many(command, tiny_run):
    _property(command, SLOW, str(tiny_run))


@pytest.mark.slow
def test_train_command_line_contract_many(train_config):
    _property("train", SLOW, train_config)


# Examples the property found, kept as plain regressions (they ran a whole evaluation, then crashed on the path).
@pytest.mark.parametrize("extra", [["--json", "."], ["--json", ".", "--grid", "g.png"], ["--grid", "g.jpg"],
                                   ["--json", "missing/r.json"], ["--cfg", "nan"]])
def test_eval_output_paths_are_checked_first(tiny_run, extra):
    check_eval(["eval", str(tiny_run), "--limit", "1", "--n-per-prompt", "1", "--steps", "1", *extra, "--no-fd",
                "--no-progress"])
    with scratch() as folder:
        assert run_cli(["eval", str(tiny_run), "--limit", "1", *extra], folder)[0] == 2


@pytest.mark.parametrize("argv", [
    ["demo", "--seed", "-5"], ["demo", "--seed", "99999999999999999999999"], ["demo", "-n", "100"],
    ["eval", "--seed", "-2", "--limit", "1"], ["eval", "--n-per-prompt", "1000000000"],
    ["eval", "--batch-size", "100000000"], ["eval-prompts", "ep", "--n-per-prompt", "100000000"],
    ["generate", "x", "--steps", "10001"], ["generate", "x", "-n", "2000000"],
    ["train", "cfg.json", "train.lr=NaN"], ["train", "cfg.json", "train.batch_size=10000000"],
])
def test_out_of_range_values_are_refused_before_any_work(argv):
    with scratch() as folder:
        (folder / "cfg.json").write_text(json.dumps(tiny_config_dict("run")))
        code, err, created = run_cli(argv, folder)
        assert_contract(code, err, created - {str(folder / "cfg.json")}, argv)
        assert code == 2
