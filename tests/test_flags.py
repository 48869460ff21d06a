"""Operations with flags: `trainbus run train.py:build lr=0.01 epochs=3` calls build(lr=0.01, epochs=3).

The flags come from the function's signature and docstring; --help-flags prints them; an unknown flag or a value
of the wrong type is one line naming the valid flags (exit 2, nothing made); the resolved flags are in config.json,
`runs list` and `runs compare`. The run's code and its plugins see RUN_ID and RUN_DIR. Real runs, real processes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import textwrap
from pathlib import Path

import pytest

from trainbus.kernel.recorded_config import config_of_run
from trainbus.kernel.flags import (FlagError, Flag, docstring_help, help_text, parse_words, resolve,
                                   signature_of)

from conftest import TESTS_DIR
from kernel_process import Command, cli

TRAIN = '''
import json
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from trainbus.kernel import TrainingSpec


def build(lr: float = 0.1, epochs: int = 2, width=5, shuffle: bool = True, tag: str | None = None,
          env_out: str = ""):
    """A linear classifier on random data.

    Args:
        lr: Learning rate of SGD.
        epochs (int): How many epochs
            to train.
        width: Input width.

    Returns:
        The spec.
    """
    seen = {"build": {k: os.environ.get(k) for k in ("RUN_ID", "RUN_DIR", "TRAINBUS_RUN_ID", "TRAINBUS_RUN_DIR")}}
    g = torch.Generator().manual_seed(123)
    x, y = torch.randn(12, width, generator=g), torch.randint(0, 3, (12,), generator=g)
    model = torch.nn.Linear(width, 3)

    def loss_fn(outputs, targets):
        if env_out and "training" not in seen:  # while training: the run directory exists, write into it
            seen["training"] = {k: os.environ.get(k) for k in ("RUN_ID", "RUN_DIR")}
            (Path(os.environ["RUN_DIR"]) / "artifact.txt").write_text("made by user code")
            Path(env_out).write_text(json.dumps(seen))
        return torch.nn.functional.cross_entropy(outputs, targets)

    return TrainingSpec(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr), loss_fn=loss_fn,
                        train_loader=DataLoader(TensorDataset(x, y), batch_size=4, shuffle=shuffle),
                        validation_loader=DataLoader(TensorDataset(x, y), batch_size=4), epochs=epochs,
                        hyperparameters={"lr": lr, "derived": width * 3})
'''

ENV_PLUGIN = '''
import json
import os

from trainbus.sdk import Plugin


class EnvWriter(Plugin):
    """Writes the run's RUN_ID and RUN_DIR as its process sees them."""

    settings = {"path": ""}

    def on_start_training_session(self, event):
        with open(self.settings["path"], "w") as f:
            json.dump({k: os.environ.get(k) for k in ("RUN_ID", "RUN_DIR", "TRAINBUS_RUN_ID", "TRAINBUS_RUN_DIR")}, f)
'''


def trainbus(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return cli(*args, timeout=timeout)  # forked with torch loaded


@pytest.fixture(scope="module")
def train_py(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("flags")
    (folder / "train.py").write_text(TRAIN)
    (folder / "env_plugin.py").write_text(ENV_PLUGIN)
    return folder / "train.py"


# -- the signature and the docstring ---------------------------------------------------------------

def test_flags_come_from_the_signature_annotations_defaults_and_docstring(train_py):
    from trainbus.kernel.target import load_target

    sig = signature_of(load_target(f"{train_py}:build"))
    assert not sig.takes_dict and not sig.takes_extra
    assert [(f.name, f.type, f.default, f.optional) for f in sig.flags] == [
        ("lr", float, 0.1, False), ("epochs", int, 2, False), ("width", int, 5, False),
        ("shuffle", bool, True, False), ("tag", str, None, True), ("env_out", str, "", False)]
    assert {f.name: f.help for f in sig.flags}["epochs"] == "How many epochs to train."


def test_a_function_taking_the_hyperparameters_dict_takes_any_flag():
    def build(hyperparameters):
        return hyperparameters

    def typed(params: dict):
        return params

    for func in (build, typed):
        sig = signature_of(func)
        assert sig.takes_dict
        assert parse_words(sig, ["lr=0.5", "model=cnn", "layers=[1, 2]"], "t") == {
            "lr": 0.5, "model": "cnn", "layers": [1, 2]}  # JSON when it parses, else the text (as --set)
        assert resolve(sig, {"lr": 0.5}, "t") == {"lr": 0.5}
        with pytest.raises(FlagError, match=r"^flag 'lr' given twice \(lr=0.5 and lr=0.2\): give it once$"):
            parse_words(sig, ["lr=0.5", "model=cnn", "lr=0.2"], "t")


def test_a_hyperparameters_parameter_with_a_default_is_one_flag_and_an_unknown_name_says_so():
    """`def build(hyperparameters=None)` is a flag of that name, not the dict: `lr=0.1` was only an unknown flag."""
    def build(hyperparameters=None):
        return hyperparameters

    sig = signature_of(build)
    assert not sig.takes_dict
    with pytest.raises(FlagError, match=r"^unknown flag 'lr' \(the parameter hyperparameters has a default, so it "
                                        r"is one flag of that name: without the default it takes the hyperparameters "
                                        r"as one dict, each NAME=VALUE into it\); flags of t: "):
        parse_words(sig, ["lr=0.1"], "t")
    assert parse_words(sig, ['hyperparameters={"lr": 0.1}'], "t") == {"hyperparameters": {"lr": 0.1}}


def test_a_positional_only_flag_is_passed_in_its_place():
    """`def build(lr=0.1, /)` was called with lr as a keyword: a TypeError, said as the user's code raising."""
    from trainbus.kernel.flags import call

    def build(lr: float = 0.1, /, width: int = 2):
        return lr, width

    sig = signature_of(build)
    assert call(build, sig, resolve(sig, {"lr": 0.5}, "t")) == (0.5, 2)


def test_numpy_style_docstrings_give_help_too():
    doc = textwrap.dedent("""\
        Train.

        Parameters
        ----------
        lr : float
            Learning rate,
            halved at each plateau.
        hidden : int
            Width.

        Returns
        -------
        TrainingSpec
        """)
    assert docstring_help(doc) == {"lr": "Learning rate, halved at each plateau.", "hidden": "Width."}


def test_an_args_section_on_the_docstrings_first_line_gives_help_and_no_summary(tmp_path):
    """`\"\"\"Args:` on the docstring's first line lost every flag's help (Python dedents the lines after the first
    to the header's column) and --help-flags printed the section as the function's summary."""
    def build(lr: float = 0.1, epochs: int = 2):
        """Args:
            lr: Learning rate.
            epochs: How many
                epochs.

        Returns:
            The spec.
        """

    def alone(lr: float = 0.1, epochs: int = 2):
        """Args:
            lr: Learning rate.
            epochs: How many
                epochs.
        """

    for function in (build, alone):
        sig = signature_of(function)
        assert [f.help for f in sig.flags] == ["Learning rate.", "How many epochs."], function
        assert help_text(function, sig, "t.py:f").splitlines()[:3] == ["usage: trainbus run t.py:f [NAME=VALUE ...]",
                                                                       "", "flags:"]


def test_values_are_typed_and_checked():
    def build(lr: float = 0.1, epochs: int = 2, fast: bool = False, name: str = "a", seed: int | None = None,
              anything=None, **extra):
        pass

    sig = signature_of(build)
    assert sig.takes_extra
    assert parse_words(sig, ["lr=1e-3", "epochs=7", "fast=yes", "name=42", "seed=none", "anything=[1]", "more=x"],
                       "t") == {"lr": 0.001, "epochs": 7, "fast": True, "name": "42", "seed": None,
                                "anything": [1], "more": "x"}
    # typed values (a config file, --set, config.json): an int widens to a float, text is parsed, defaults filled in
    assert resolve(sig, {"lr": 1, "epochs": "3"}, "t") == {"lr": 1.0, "epochs": 3, "fast": False, "name": "a",
                                                           "seed": None, "anything": None}
    for words, expected in ((["epochs=2.5"], "flag epochs: '2.5' is not an integer"),
                            (["fast=maybe"], "flag fast: 'maybe' is not true or false (or yes/no, on/off, 1/0)"),
                            (["lr"], "'lr' is not a flag: flags are NAME=VALUE")):
        with pytest.raises(FlagError, match=re.escape(expected)):
            parse_words(sig, words, "t")
    with pytest.raises(FlagError, match="flag epochs: true is not an integer"):
        resolve(sig, {"epochs": True}, "t")
    # `--set name=42` is JSON's 42: the error said "not a string" without the way to give text
    with pytest.raises(FlagError) as raised:
        resolve(sig, {"name": 42}, "t")
    assert str(raised.value).startswith(
        "flag name: 42 is not a string (text is quoted: --set 'name=\"42\"', or name = \"42\" in a config file); "
        "flags of t: "), raised.value

    def needs(data_dir: str):
        pass

    with pytest.raises(FlagError, match="flag 'data_dir' is required: add data_dir=VALUE"):
        resolve(signature_of(needs), {}, "t")


def test_a_union_annotation_takes_what_it_names_not_only_the_defaults_type():
    """`mix: int | float = 1` refused mix=2.5 ("'2.5' is not an integer"): a union of several types was taken for no
    annotation, and the flag typed by its default."""
    def build(mix: int | float = 1, either: str | int = "a", maybe: float | int | None = None):
        pass

    sig = signature_of(build)
    assert [f.describe() for f in sig.flags] == ["mix (number, default 1)", "either (any, default a)",
                                                 "maybe (number or none, default null)"]
    assert parse_words(sig, ["mix=2.5", "either=3", "maybe=2"], "t") == {"mix": 2.5, "either": 3, "maybe": 2}
    # an integer stays one (Lightning's limit_train_batches: 10 batches, 0.5 of them), from a config file too
    assert type(parse_words(sig, ["maybe=2"], "t")["maybe"]) is int
    assert resolve(sig, {"mix": 3, "maybe": 0.5}, "t") == {"mix": 3, "either": "a", "maybe": 0.5}
    assert type(resolve(sig, {"mix": 3}, "t")["mix"]) is int
    with pytest.raises(FlagError, match=re.escape("flag mix: true is not a number")):
        resolve(sig, {"mix": True}, "t")
    with pytest.raises(FlagError, match=re.escape("flag mix: 'x' is not a number")):
        parse_words(sig, ["mix=x"], "t")


def test_list_flags_take_a_json_list_of_their_items():
    """`layers: list[int]` showed as `any` and took `layers=5` (an int, where the function expects a list)."""
    def build(layers: list[int] = [64], rates: list[float] = [0.1], tags: list = [], names: list[str] | None = None):
        pass

    sig = signature_of(build)
    assert [f.describe() for f in sig.flags[:3]] == ["layers (list[int], default [64])",
                                                     "rates (list[float], default [0.1])", "tags (list, default [])"]
    assert parse_words(sig, ["layers=[128,64]", "rates=[1,0.5]", "tags=[1,\"a\"]", "names=none"], "t") == {
        "layers": [128, 64], "rates": [1.0, 0.5], "tags": [1, "a"], "names": None}
    assert resolve(sig, {"layers": [8], "rates": [2], "names": ["x"]}, "t")["rates"] == [2.0]  # a config file's
    for words, expected in ((["layers=5"], "flag layers: '5' is not a JSON list of integers"),
                            (["layers=[1.5]"], "flag layers: '[1.5]' is not a JSON list of integers"),
                            (["layers=[true]"], "flag layers: '[true]' is not a JSON list of integers"),
                            (["names=[1]"], "flag names: '[1]' is not a JSON list of strings"),
                            (["rates=x"], "flag rates: 'x' is not a JSON list of numbers")):
        with pytest.raises(FlagError, match=re.escape(expected)):
            parse_words(sig, words, "t")
    with pytest.raises(FlagError, match=re.escape("flag layers: 5 is not a JSON list of integers")):
        resolve(sig, {"layers": 5}, "t")


# -- the command line --------------------------------------------------------------------------------

def test_help_flags_prints_each_flag_with_type_default_and_help(train_py, tmp_path):
    r = trainbus("run", f"{train_py}:build", "--help-flags", "--runs-dir", str(tmp_path / "runs"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"usage: trainbus run {train_py}:build [NAME=VALUE ...]"
    assert "A linear classifier on random data." in lines
    rows = {line.split()[0]: line.split(None, 3) for line in lines[lines.index("flags:") + 2:]}
    assert rows["lr"] == ["lr", "float", "0.1", "Learning rate of SGD."]
    assert rows["epochs"] == ["epochs", "int", "2", "How many epochs to train."]
    assert rows["width"][:3] == ["width", "int", "5"]
    assert rows["tag"] == ["tag", "str|none", "null"]
    assert rows["env_out"][:3] == ["env_out", "str", '""']  # an empty default was a blank cell
    assert not (tmp_path / "runs").exists()
    # a dict function says what it takes
    r = trainbus("run", f"{TESTS_DIR / 'specs.py'}:tiny", "--help-flags")
    assert r.returncode == 0 and "takes the hyperparameters as one dict" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("words, expected", [
    (["lrr=0.1"], "unknown flag 'lrr' (did you mean 'lr'?); flags of "),  # a typo: the flag it is close to
    (["LR=0.1"], "unknown flag 'LR' (did you mean 'lr'?); flags of "),  # too short for difflib's ratio to see it
    (["lr=fast"], "flag lr: 'fast' is not a number; flags of "),
    (["epochs=1.5"], "flag epochs: '1.5' is not an integer; flags of "),
])
def test_an_unknown_flag_or_a_bad_value_is_one_line_naming_the_flags_and_nothing_is_made(train_py, tmp_path, words,
                                                                                          expected):
    r = trainbus("run", f"{train_py}:build", *words, "--plugins", "", "--runs-dir", str(tmp_path / "runs"))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and expected in r.stderr, r.stderr
    assert "lr (float, default 0.1), epochs (int, default 2), width (int, default 5)" in r.stderr  # the valid flags
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("word, option", [("seed=3", "--seed 3"), ("device=cpu", "--device cpu"),
                                          ("precision=bf16-mixed", "--precision bf16-mixed"),
                                          ("accumulate_grad_batches=4", "--accumulate-grad-batches 4")])
def test_a_flag_that_is_an_option_of_run_says_the_option(train_py, tmp_path, word, option):
    """Guild's and Lightning's users write the run's settings as flags (`seed=3`): the error listed the function's
    flags and left them wondering where the seed goes."""
    r = trainbus("run", f"{train_py}:build", word, "--plugins", "", "--runs-dir", str(tmp_path / "runs"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    name = word.partition("=")[0]
    assert r.stderr.startswith(f"error: unknown flag {name!r} ({name} is an option of trainbus run, not a flag of "
                               f"{train_py}:build: {option}); flags of "), r.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("given", ["--set", "config"])
def test_an_option_of_run_set_as_a_hyperparameter_says_the_option_too(train_py, tmp_path, given):
    """`--set seed=3`, or `seed = 3` in a config's [hyperparameters], was `unknown flag 'seed'` and the function's
    flags alone, where `seed=3` on the command line (and the demo, either way) named `--seed 3`."""
    config = tmp_path / "run.toml"
    config.write_text("[hyperparameters]\nseed = 3\n")
    words = ["--set", "seed=3"] if given == "--set" else ["--config", str(config)]
    r = trainbus("run", f"{train_py}:build", *words, "--plugins", "", "--runs-dir", str(tmp_path / "runs"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"error: unknown flag 'seed' (seed is an option of trainbus run, not a flag of "
                               f"{train_py}:build: --seed 3); flags of "), r.stderr
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def flag_runs(train_py, tmp_path_factory):
    """Two runs of train.py with different flags (one with a plugin that writes its environment) and one of a
    function taking the hyperparameters dict, all through the command line."""
    tmp = tmp_path_factory.mktemp("flag_runs")
    runs_dir = tmp / "runs"
    env_user, env_plugin = tmp / "env_user.json", tmp / "env_plugin.json"
    settings = json.dumps(str(env_plugin))
    config = tmp / "run.toml"
    config.write_text(f'[plugins.envwriter]\ntarget = "env_plugin:EnvWriter"\nsettings = {{ path = {settings} }}\n')
    env = dict(os.environ, PYTHONPATH=f"{TESTS_DIR}{os.pathsep}{train_py.parent}")
    runs = [["run", f"{train_py}:build", "lr=0.05", "epochs=1", f"env_out={env_user}", "--config", str(config)],
            ["run", f"{train_py}:build", "lr=0.2", "shuffle=false", "--plugins", ""],
            ["run", f"{TESTS_DIR / 'specs.py'}:tiny", "lr=0.3", "note=dict", "--epochs", "1", "--plugins", ""]]
    # all three at once: they share nothing but runs_dir
    procs = [Command(*args, "--runs-dir", str(runs_dir), env=env) for args in runs]
    ids = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, err
            ids.append(out.split("run ")[1].split(":")[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return runs_dir, ids, env_user, env_plugin


def test_the_resolved_flags_are_in_config_json_and_a_continued_run_gets_them_again(flag_runs):
    runs_dir, (first, second, tiny), _, _ = flag_runs
    config = json.loads((runs_dir / first / "config.json").read_text())
    assert config["flags"] == {"lr": 0.05, "epochs": 1, "width": 5, "shuffle": True, "tag": None,
                               "env_out": config["flags"]["env_out"]}
    assert config["hyperparameters"]["derived"] == 15  # what the spec said, beside the flags
    assert config["epochs"] == 1
    assert config_of_run(runs_dir / first).hyperparameters == config["flags"]  # not the spec's extra keys
    tiny_config = json.loads((runs_dir / tiny / "config.json").read_text())
    assert tiny_config["flags"] == {"lr": 0.3, "note": "dict"}  # what the dict function was given


def test_plugins_and_checkpoints_see_the_flags_as_hyperparameters(flag_runs):
    """A build(lr=..., shuffle=...) that names only some hyperparameters in its spec: start_training_session and
    end_epoch (what metrics_log, TensorBoard's hparams and a checkpoint record) carry every flag, and what the
    spec said wins over a flag of the same name."""
    from trainbus.kernel.journal import read_events
    from trainbus.proto import JOURNAL_NAME

    runs_dir, (first, second, tiny), _, _ = flag_runs
    events = list(read_events(runs_dir / second / JOURNAL_NAME))
    for type_ in ("start_training_session", "end_epoch"):
        hyperparameters = next(e.data["hyperparameters"] for e in events if e.type == type_)
        assert hyperparameters == {"lr": 0.2, "epochs": 2, "width": 5, "shuffle": False, "tag": None, "env_out": "",
                                   "derived": 15}, (type_, hyperparameters)
    tiny_session = next(e.data for e in read_events(runs_dir / tiny / JOURNAL_NAME)
                        if e.type == "start_training_session")
    assert "note" not in tiny_session["hyperparameters"], "a dict function's spec says what its hyperparameters are"


def test_runs_list_and_compare_show_the_flags(flag_runs):
    runs_dir, (first, second, tiny), _, _ = flag_runs
    r = trainbus("runs", "list", "--runs-dir", str(runs_dir))
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line for line in r.stdout.splitlines()[1:]}
    assert "lr=0.05 epochs=1 width=5 shuffle=true tag=null" in rows[first]
    assert "lr=0.2 epochs=2 width=5 shuffle=false" in rows[second]
    assert "lr=0.3 note=dict" in rows[tiny]

    r = trainbus("runs", "compare", first, second, "--runs-dir", str(runs_dir), "--json")
    assert r.returncode == 0, r.stderr
    compared = json.loads(r.stdout)
    assert [c["id"] for c in compared] == [first, second]
    assert [c["flags"]["lr"] for c in compared] == [0.05, 0.2]
    for c in compared:
        assert c["status"] == "completed"
        assert isinstance(c["metrics"]["validation_loss"], float) and isinstance(c["metrics"]["training_loss"], float)
        assert c["metrics"]["best_validation_loss"] <= c["metrics"]["validation_loss"]
    # a unique start of an id (the runs started in the same second: their ids differ in the random part)
    others = [p.name for p in runs_dir.iterdir() if p.is_dir() and p.name != first]
    prefix = next(first[:n] for n in range(16, len(first) + 1) if not any(o.startswith(first[:n]) for o in others))
    r = trainbus("runs", "compare", prefix, second, "--runs-dir", str(runs_dir))
    assert r.returncode == 0, r.stderr
    header, *lines = r.stdout.splitlines()
    assert header.split()[:9] == ["run", "status", "target", "lr", "epochs", "width", "shuffle", "tag", "env_out"]
    assert "val loss" in header and "best val loss" in header
    assert lines[0].split()[3:5] == ["0.05", "1"] and lines[1].split()[3:5] == ["0.2", "2"]


def test_the_users_code_and_a_plugin_see_run_id_and_run_dir(flag_runs):
    runs_dir, (first, _, _), env_user, env_plugin = flag_runs
    run_dir = str((runs_dir / first).resolve())
    expected = {"RUN_ID": first, "RUN_DIR": run_dir}
    seen = json.loads(env_user.read_text())
    assert seen["build"] == {**expected, "TRAINBUS_RUN_ID": first, "TRAINBUS_RUN_DIR": run_dir}
    assert seen["training"] == expected
    assert (runs_dir / first / "artifact.txt").read_text() == "made by user code"
    assert json.loads(env_plugin.read_text()) == {**expected, "TRAINBUS_RUN_ID": first, "TRAINBUS_RUN_DIR": run_dir}


def test_help_text_of_a_function_without_parameters():
    def build():
        """Nothing to set."""

    assert help_text(build, signature_of(build), "t.py:build").splitlines()[-1] == "t.py:build takes no flags."
    with pytest.raises(FlagError, match="unknown flag 'lr'; flags of t.py:build: none"):
        resolve(signature_of(build), {"lr": 1}, "t.py:build")
    assert Flag("x", int, 3).describe() == "x (int, default 3)"


def test_epochs_given_as_the_option_is_the_functions_epochs_flag_too(tmp_path):
    """`trainbus run train.py:build --epochs 1` trained 1 epoch while runs list and compare showed epochs=5, the
    function's default, and the function had built for 5."""
    from trainbus.kernel.config import RunConfig
    from trainbus.kernel.session import run_training

    (tmp_path / "train.py").write_text(
        "from trainbus.kernel.digits import build as digits\n\n\n"
        "def build(lr: float = 0.001, epochs: int = 5):\n"
        "    return digits({'lr': lr, 'epochs': epochs})\n")
    result = run_training(RunConfig(target=f"{tmp_path / 'train.py'}:build", epochs=1, runs_dir=str(tmp_path / "runs"),
                                    device="cpu", plugins=[]))
    assert result.status == "completed" and result.outcome["epochs_completed"] == 1
    config = json.loads((Path(result.run_dir) / "config.json").read_text())
    assert config["flags"] == {"lr": 0.001, "epochs": 1} and config["epochs"] == 1, config


def test_a_file_target_without_a_function_names_its_build(train_py, tmp_path):
    """Guild's `guild run train.py lr=0.1` typed as `trainbus run train.py lr=0.1 epochs=1` was refused: "target
    'train.py' must look like path/to/file.py:function". A file named alone is its `build`, recorded as such; a file
    with no `build` is one line naming its functions."""
    r = cli("run", train_py.name, "lr=0.05", "epochs=1", "--plugins", "", "--runs-dir", str(tmp_path / "runs"),
            cwd=train_py.parent)
    assert r.returncode == 0, r.stderr
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["target"] == "train.py:build" and config["flags"]["lr"] == 0.05, config
    r = trainbus("run", str(train_py), "--help-flags")
    assert r.returncode == 0 and r.stdout.startswith(f"usage: trainbus run {train_py}:build "), r.stdout + r.stderr
    (tmp_path / "other.py").write_text("def make(lr=0.1):\n    pass\n\n\ndef _private():\n    pass\n")
    r = cli("run", "other.py", "--plugins", "", "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "other.py has no function 'build'" in r.stderr and "other.py:make" in r.stderr, r.stderr


def test_a_guild_script_named_alone_is_refused_before_its_code_runs(tmp_path):
    """A Guild script (flags as globals, training at its top level) named alone would be imported, training as it
    went, to find it has no build: it is refused first, in one line, with the way to write one."""
    (tmp_path / "script.py").write_text("from pathlib import Path\n\nlr = 0.1\nPath('trained').write_text('yes')\n")
    r = cli("run", "script.py", "lr=0.2", "--plugins", "", "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr == ("error: script.py has no function 'build': trainbus calls a function that returns a "
                        "TrainingSpec, its parameters the flags; define one in it, as build(lr=0.1), or name yours, "
                        "script.py:FUNCTION\n"), r.stderr
    assert not (tmp_path / "trained").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("given", [["epochs=1"], ["--set", "epochs=1"]])
def test_epochs_on_the_command_line_beats_the_config_files(train_py, tmp_path, given):
    """A config file's `[run] epochs = 3` and `epochs=1` on the command line: the run trains 1, as a flag beats the
    file everywhere else (it trained 3, having built the function for 1)."""
    (tmp_path / "run.toml").write_text(f'[run]\ntarget = "{train_py}:build"\nepochs = 3\n'
                                       f'runs_dir = "{tmp_path / "runs"}"\ndevice = "cpu"\n[plugins]\n')
    r = trainbus("run", "--config", str(tmp_path / "run.toml"), *given)
    assert r.returncode == 0, r.stderr
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["outcome"]["epochs_completed"] == 1, summary
    assert json.loads((run_dir / "config.json").read_text())["epochs"] == 1


def test_a_mistake_in_a_config_files_hyperparameters_names_the_file(train_py, tmp_path):
    """`unknown flag 'lrr'` alone sent the user looking through their command line; a name the command line gives
    too (and so overrides) is the command line's, said as before. The demo's own checks say it too. In this process
    (the CLI's checks, not a run): each `trainbus` would import torch again."""
    from typer.testing import CliRunner

    from trainbus.kernel.cli import UserError, app
    from trainbus.kernel.spec import SpecError

    def said(*args: str) -> str:  # what main() prints after `error: `
        result = CliRunner().invoke(app, ["run", "--config", str(config), "--plugins", "", *args])
        assert isinstance(result.exception, (UserError, SpecError)), (result.exception, result.output)
        return str(result.exception)

    config = tmp_path / "run.toml"
    for table, error, name in (('lrr = 0.1\nlr = "fast"', "unknown flag 'lrr' (did you mean 'lr'?); flags of ", "lrr"),
                               ('lr = "fast"', "flag lr: 'fast' is not a number; flags of ", "lr")):
        config.write_text(f'[run]\ntarget = "{train_py}:build"\nruns_dir = "{tmp_path / "runs"}"\n'
                          f'[hyperparameters]\n{table}\nwidth = 3\n')
        for queued in ([], ["--detach"]):  # found as the run is built; as it is queued, before any daemon or run
            text = said("width=4", *queued)
            assert text.startswith(error) and text.endswith(f" ({name} is set in {config}'s [hyperparameters])"), text
    text = said("lrr=0.2", "lr=0.5")  # the command line's own
    assert "unknown flag 'lrr'" in text and "is set in" not in text, text
    config.write_text(f'[run]\nruns_dir = "{tmp_path / "runs"}"\n[hyperparameters]\nlrr = 0.1\n')  # the demo
    assert said().endswith(f"(lrr is set in {config}'s [hyperparameters])")
    assert not (tmp_path / "runs").exists()



def test_a_mistake_in_bz_json_config_names_the_section_it_is_in(train_py, tmp_path):
    """bz's config sets hyperparameters in "training" (bz's own batch_size, learning_rate) and "hyperparameters"; the
    error named a [hyperparameters] table, which a JSON file does not have, for a key of "training"."""
    from typer.testing import CliRunner

    from trainbus.kernel.cli import app

    config = tmp_path / "bz_config.json"
    for body, name, where in (({"training": {"epochs": 1, "batch_size": 8}}, "batch_size", '"training"'),
                              ({"training": {"epochs": 1}, "hyperparameters": {"lrr": 0.1}}, "lrr",
                               '"hyperparameters"')):
        config.write_text(json.dumps({**body, "plugins": {}}))
        result = CliRunner().invoke(app, ["run", f"{train_py}:build", "--config", str(config), "--runs-dir",
                                          str(tmp_path / "runs")])
        assert str(result.exception).endswith(f"({name} is set in {config}'s {where})"), result.exception
    assert not (tmp_path / "runs").exists()


CHOICES_TRAIN = '''
import enum
from pathlib import Path
from typing import Literal, Optional

import torch

from trainbus.kernel import TrainingSpec


class Opt(enum.Enum):
    SGD = "sgd"
    ADAM = "adam"


def build(act: Literal["relu", "tanh"] = "relu", data_dir: Path = Path("data"), opt: Opt = Opt.SGD,
          width: Optional[Literal[2, 4]] = None):
    # what argparse's type=Path and typer's enums gave this code; a str here breaks on `data_dir / "x"`
    assert isinstance(data_dir, Path) and isinstance(opt, Opt), (data_dir, opt)
    model = torch.nn.Linear(2, 1)
    return TrainingSpec(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        loss_fn=lambda out, y: (out - y).pow(2).mean(),
                        train_loader=[(torch.ones(2, 2), torch.ones(2, 1))])
'''


def test_literal_enum_and_path_flags_take_their_values_and_refuse_others(tmp_path):
    """A Guild user's choices: `act: Literal["relu", "tanh"]` took act=sigmoid without a word (the function's
    else branch trained tanh), and a `Path` or Enum flag reached the function as text, which broke in the user's
    code (`'str' / 'str'`). Now a value outside the choices is one line naming them, a Path flag is a Path and an
    Enum's is its member (by name or value), and the records hold their plain values, read back on a resume."""
    ns: dict = {}
    exec(compile(CHOICES_TRAIN, "choices.py", "exec"), ns)  # noqa: S102 -- the spec file's own source
    import enum

    sig = signature_of(ns["build"])
    flags = {f.name: f for f in sig.flags}
    assert flags["act"].choices == ("relu", "tanh") and flags["act"].type is str
    assert flags["width"].choices == (2, 4) and flags["width"].optional
    assert parse_words(sig, ["act=tanh", "data_dir=/tmp/x", "opt=ADAM", "width=4"], "t") == {
        "act": "tanh", "data_dir": "/tmp/x", "opt": "adam", "width": 4}  # plain: they are queued and recorded
    resolved = resolve(sig, {"data_dir": "/tmp/x", "opt": "adam", "width": None}, "t")
    assert resolved["data_dir"] == Path("/tmp/x") and resolved["opt"] is ns["Opt"].ADAM and resolved["act"] == "relu"
    assert isinstance(resolved["opt"], enum.Enum)
    for words, expected in ((["act=sigmoid"], "flag act: 'sigmoid' is not one of relu, tanh; flags of t: "
                                              "act (one of relu, tanh; default relu), data_dir (path, default data), "
                                              "opt (one of sgd, adam; default sgd), width (one of 2, 4 or none; "
                                              "default null)"),
                            (["opt=rmsprop"], "flag opt: 'rmsprop' is not one of sgd, adam;"),
                            (["width=3"], "flag width: '3' is not one of 2, 4;")):
        with pytest.raises(FlagError) as caught:
            parse_words(sig, words, "t")
        assert str(caught.value).startswith(expected), str(caught.value)
    with pytest.raises(FlagError, match="flag act: 'gelu' is not one of relu, tanh"):
        resolve(sig, {"act": "gelu"}, "t")  # a config file's value
    with pytest.raises(FlagError, match="flag data_dir: 3 is not a path"):
        resolve(sig, {"data_dir": 3}, "t")
    lines = help_text(ns["build"], sig, "t").splitlines()
    rows = {line.split()[0]: line.split()[:3] for line in lines[lines.index("flags:") + 2:]}
    assert rows["act"] == ["act", "{relu,tanh}", "relu"] and rows["data_dir"] == ["data_dir", "path", "data"]
    assert rows["opt"] == ["opt", "{sgd,adam}", "sgd"] and rows["width"] == ["width", "{2,4}|none", "null"]

    (tmp_path / "choices.py").write_text(CHOICES_TRAIN)
    runs_dir = tmp_path / "runs"
    r = trainbus("run", f"{tmp_path / 'choices.py'}:build", "act=sigmoid", "--plugins", "", "--runs-dir", str(runs_dir))
    assert r.returncode == 2 and r.stderr.startswith("error: flag act: 'sigmoid' is not one of relu, tanh;"), r.stderr
    assert not runs_dir.exists()
    r = trainbus("run", f"{tmp_path / 'choices.py'}:build", "opt=adam", "data_dir=/tmp/d", "--plugins", "checkpoint",
                 "--runs-dir", str(runs_dir), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    (run_dir,) = [p for p in runs_dir.iterdir() if p.is_dir()]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["flags"] == {"act": "relu", "data_dir": "/tmp/d", "opt": "adam", "width": None}, config["flags"]
    r = trainbus("run", "--resume", run_dir.name, "--epochs", "2", "--runs-dir", str(runs_dir))  # read back as typed
    assert r.returncode == 0, r.stderr


SEEDED = '''
import json

import torch

from trainbus.kernel.digits import build as digits

AT_IMPORT = torch.rand(3).tolist()  # a script's module-level draw: a model made at its top, a random split


def build(lr: float = 0.001):
    spec = digits({"lr": lr, "epochs": 1})
    with open("draws.json", "w") as f:  # in the run's working directory
        json.dump({"import": AT_IMPORT, "build": torch.rand(3).tolist()}, f)
    return spec
'''


def test_a_scripts_module_level_draws_are_seeded_whether_or_not_flags_are_given(tmp_path):
    """`--seed` seeded the build but not the import of the target, which the command line makes first when it reads
    flags: a script drawing at its top (a model built there) got other weights each run. The import and the build
    each start from the seed, with flags or without."""
    (tmp_path / "seeded.py").write_text(SEEDED)
    target = f"{tmp_path / 'seeded.py'}:build"
    draws = {}
    for name, words in (("bare", []), ("flags", ["lr=0.001"]), ("again", ["lr=0.001"]), ("other", ["lr=0.001"])):
        (tmp_path / name).mkdir()
        seed = "4" if name == "other" else "3"
        done = cli("run", target, *words, "--seed", seed, "--epochs", "1", "--plugins", "", "--runs-dir",
                   str(tmp_path / "runs"), cwd=tmp_path / name)
        assert done.returncode == 0, done.stderr
        draws[name] = json.loads((tmp_path / name / "draws.json").read_text())
    assert draws["bare"] == draws["flags"] == draws["again"]
    assert draws["other"]["import"] != draws["bare"]["import"] and draws["other"]["build"] != draws["bare"]["build"]


def test_an_integer_flag_past_64_bits_is_carried_as_its_text_and_the_epochs_keep_their_metrics(tmp_path):
    """`trainbus run train.py:build salt=99999999999999999999` (an int flag no 64-bit integer holds, as msgpack's
    are) ran, and its config.json said it, but start_training_session and every end_epoch were journaled as
    `{"error": "event data not encodable: ... cannot serialize int"}`: their losses, metrics and hyperparameters were
    lost to `runs show`, metrics_log and every plugin, without a word. Events carry such a value as its text."""
    from trainbus.kernel.journal import read_events
    from trainbus.proto import JOURNAL_NAME

    (tmp_path / "salted.py").write_text(
        "import torch\nfrom torch.utils.data import DataLoader, TensorDataset\nfrom trainbus.kernel import "
        "TrainingSpec\n\n\ndef build(lr: float = 0.1, salt: int = 0):\n"
        "    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))\n    model = torch.nn.Linear(4, 2)\n"
        "    return TrainingSpec(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),\n"
        "                        loss_fn=torch.nn.functional.cross_entropy,\n"
        "                        train_loader=DataLoader(TensorDataset(x, y), batch_size=4),\n"
        "                        hyperparameters={'nested': {'big': -10**20}})\n")
    runs_dir = tmp_path / "runs"
    r = trainbus("run", f"{tmp_path / 'salted.py'}:build", f"salt={10**20}", "--plugins", "", "--runs-dir",
                 str(runs_dir), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    (run_dir,) = [p for p in runs_dir.iterdir() if p.is_dir()]
    assert json.loads((run_dir / "config.json").read_text())["flags"]["salt"] == 10**20  # the record keeps the number
    events = list(read_events(run_dir / JOURNAL_NAME))
    assert not [e for e in events if "error" in e.data], [e.data for e in events if "error" in e.data]
    for type_ in ("start_training_session", "end_epoch"):
        data = next(e.data for e in events if e.type == type_)
        assert data["hyperparameters"]["salt"] == str(10**20), data
        assert data["hyperparameters"]["nested"] == {"big": str(-10**20)}, data
    assert isinstance(next(e.data for e in events if e.type == "end_epoch")["training_loss"], float)


def test_a_hyperparameter_past_what_an_event_carries_is_described_there_and_the_epochs_keep_their_metrics(tmp_path):
    """A spec whose hyperparameters hold a list of 150,000 class names (past the 100,000 items a protocol array
    takes): start_training_session and every end_epoch were journaled as `{"error": "event data not encodable:
    ... exceeds max_array_len(100000)"}`, their losses and metrics lost to `runs show`, metrics_log (its epoch
    records all null) and every plugin, and every checkpoint failed ("snapshot buffer None cannot be read"). Events
    and checkpoints carry such a value's description; config.json keeps it whole."""
    from trainbus.kernel.journal import read_events
    from trainbus.proto import JOURNAL_NAME

    (tmp_path / "vocab.py").write_text(
        "import torch\nfrom torch.utils.data import DataLoader, TensorDataset\nfrom trainbus.kernel import "
        "TrainingSpec\n\n\ndef build(lr: float = 0.1):\n"
        "    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))\n    model = torch.nn.Linear(4, 2)\n"
        "    return TrainingSpec(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),\n"
        "                        loss_fn=torch.nn.functional.cross_entropy,\n"
        "                        train_loader=DataLoader(TensorDataset(x, y), batch_size=4),\n"
        "                        hyperparameters={'classes': [f'c{i}' for i in range(150_000)]})\n")
    runs_dir = tmp_path / "runs"
    r = trainbus("run", f"{tmp_path / 'vocab.py'}:build", "--plugins", "checkpoint", "--runs-dir", str(runs_dir),
                 "--device", "cpu")
    assert r.returncode == 0 and "could not be written" not in r.stdout, r.stdout + r.stderr
    (run_dir,) = [p for p in runs_dir.iterdir() if p.is_dir()]
    # its save_checkpoint, which carries the snapshot's plain part, failed too: no checkpoint was written
    import torch
    saved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert saved["hyperparameters"]["classes"].startswith("a list of 150,000 items"), saved["hyperparameters"]
    assert len(json.loads((run_dir / "config.json").read_text())["hyperparameters"]["classes"]) == 150_000
    events = list(read_events(run_dir / JOURNAL_NAME))
    assert not [e for e in events if "error" in e.data], [str(e.data)[:200] for e in events if "error" in e.data]
    for type_ in ("start_training_session", "end_epoch"):
        data = next(e.data for e in events if e.type == type_)
        assert data["hyperparameters"]["lr"] == 0.1, data
        assert data["hyperparameters"]["classes"].startswith("a list of 150,000 items"), data
    assert isinstance(next(e.data for e in events if e.type == "end_epoch")["training_loss"], float)
