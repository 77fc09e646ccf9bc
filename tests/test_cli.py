"""The three command lines share one shape: subcommands, and a ``--help`` that lists them."""
import json
from unittest import mock

import pytest

import ffl.bench
import ffl.book
import ffl.zoo


@pytest.mark.parametrize("module, commands", [
    (ffl.zoo, ["train", "spec", "merge", "info"]),
    (ffl.bench, ["zoo", "zoo-time", "conv", "profile", "chunks", "ffl"]),
    (ffl.book, ["run", "html", "zoos"]),
])
def test_help_lists_the_subcommands(module, commands, capsys):
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert [c.name for c in module.COMMANDS] == commands
    assert all(f"    {c} " in out for c in commands), out


def test_book_keeps_its_options_without_a_subcommand():
    with mock.patch.object(ffl.book, "run_book") as run, mock.patch.object(ffl.book, "build_html") as html:
        ffl.book.main(["--profile", "paper", "--only", "cifar100_mlp", "--no-html"])
        assert run.call_args.args == ("paper",)
        assert run.call_args.kwargs["only"] == ["cifar100_mlp"] and run.call_args.kwargs["html"] is False
        ffl.book.main(["--html-only"])
        ffl.book.main(["html"])
        assert run.call_count == 1 and html.call_count == 2


def test_book_zoos_prints_every_zoo_and_what_is_not_trained(tmp_path, capsys):
    from ffl.costs import book_zoos

    assert ffl.book.main(["zoos", "--profile", "smoke", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    n = len({ffl.zoo.cached_zoo_root(z["spec"], tmp_path) for z in book_zoos("smoke")})
    assert f"[ffl.book] {n} zoos," in out and f"; {n} not trained yet" in out and "cnn_gap" in out


def test_zoo_spec_prints_the_profile_spec(capsys):
    assert ffl.zoo.main(["spec", "--profile", "paper", "--arch", "mlp"]) == 0
    spec = ffl.zoo.ZooSpec.from_dict(json.loads(capsys.readouterr().out))
    assert spec == ffl.zoo.spec_from_profile("paper", "cifar100", arch="mlp", dataset="cifar100")
    assert (spec.epochs, spec.lr_step_epochs, len(spec.tasks), spec.runs) == (100, [70], 50, 100)
