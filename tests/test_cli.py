"""The command table: each command's parser is built against the function it calls."""

import inspect

import pytest

from qsimpo import cli


def target(adapter: str, out: str | None = None, batch_size: int = 8, verify: bool = True, datasets: list[str] = ()):
    return dict(adapter=adapter, out=out, batch_size=batch_size, verify=verify, datasets=list(datasets))


def command():
    c = cli._Command("qsimpo x", "test", target)
    c.arg("adapter", help="adapter")
    c.arg("--out", help="output")
    c.arg("--batch-size", type=int, help="pairs per pass")
    c.arg("--no-verify", dest="verify", action="store_false", help="skip")
    c.arg("--dataset", dest="datasets", action="append", help="repeatable")
    return c


def test_defaults_come_from_the_signature_and_options_left_out_are_not_passed():
    assert command().run(["a"]) == target("a")
    assert command().run(["a", "--batch-size", "2", "--no-verify", "--dataset", "x", "--dataset", "y"]) == \
        dict(adapter="a", out=None, batch_size=2, verify=False, datasets=["x", "y"])
    text = command().parser.format_help()
    assert "pairs per pass (default: 8)" in text and "output\n" in text  # None defaults are explained by the help itself


def test_a_flag_that_names_no_parameter_fails_when_the_parser_is_built():
    with pytest.raises(KeyError, match="batch"):
        cli._Command("qsimpo x", "test", lambda adapter: None).arg("--batch", type=int, help="?")


@pytest.mark.parametrize("name", ["quickstart", "demo", "merge", "push", "eval"])
def test_every_command_help_matches_its_function(name, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    fn = {"quickstart": "qsimpo.quickstart:run_quickstart", "demo": "qsimpo.demo.app:launch_demo",
          "merge": "qsimpo.export.merge:merge", "push": "qsimpo.export.hub:push", "eval": "qsimpo.eval.evaluate:evaluate"}[name]
    module, attr = fn.split(":")
    params = inspect.signature(getattr(__import__(module, fromlist=[attr]), attr)).parameters
    for p in params.values():  # every default a user can set is the one the function uses
        if p.default not in (None, inspect.Parameter.empty, False, True, ()) and f"--{p.name.replace('_', '-')}" in out:
            assert f"(default: {p.default})" in " ".join(out.split()), p.name
