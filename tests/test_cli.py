import json
import subprocess
import sys

import pytest
import yaml

from mage_bench.cli import main


def test_help_does_not_import_torch():
    code = "import sys; from mage_bench.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_help_lists_every_contract_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for command in ("train", "generate", "eval", "sweep", "report", "import", "tokenizer"):
        assert command in text


@pytest.mark.parametrize(("argv", "message"), [
    (["sweep", "masking", "--preset", "hughe", "--dry-run"], "unknown preset 'hughe'"),
    (["report", "no/such/runs", "--out", "reports/x"], "is not a folder of runs"),
    (["report", "runs"], "needs --out"),
])
def test_sweep_and_report_bad_input_is_one_line(argv, message, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.err.count("\n") == 1
    assert captured.out == ""


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["import", "x.pth"])  # --kind and --out missing
    assert info.value.code == 2


def test_tokenizer_train_json_and_bad_config(tmp_path, tiny_job_layer, capsys):
    config = tmp_path / "tok.yaml"
    config.write_text(yaml.safe_dump({**tiny_job_layer, "train": {**tiny_job_layer["train"], "steps": 3}}))
    out = tmp_path / "vq"
    assert main(["tokenizer", "train", "--data", "digits", "--out", str(out), "--config", str(config),
                 "--json", "--quiet"]) == 0
    card = json.loads(capsys.readouterr().out)  # exactly one JSON document
    assert card["steps"] == 3 and (out / "card.json").exists() and (out / "config.yaml").exists()

    config.write_text("train: {stpes: 3}\n")
    assert main(["tokenizer", "train", "--out", str(tmp_path / "v2"), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.stpes' (did you mean 'steps'?)" in err and err.count("\n") == 1
    assert not (tmp_path / "v2").exists()


def test_console_script_entry_point(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mage_bench.cli", "tokenizer", "train", "--data", "nope",
                             "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == ("mage-bench: error: unknown data set 'nope'; choose one of: cifar10, "
                                     "digits, imagefolder")


def test_train_and_generate_from_the_cli(tmp_path, tiny_run_layer, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_run_layer))
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(run), "--steps", "4", "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 4
    assert main(["train", "--config", str(config), "--out", str(run), "--steps", "4"]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main(["generate", "--run", str(run), "--num", "3", "--out", str(tmp_path / "s"), "--steps", "2",
                 "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    assert sorted(p.name for p in (tmp_path / "s").glob("*.png")) == ["000000.png", "000001.png", "000002.png",
                                                                       "grid.png"]


def test_train_bad_masking_is_one_line(tmp_path, tiny_run_layer, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_run_layer))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "r"), "--masking", "unifrom"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'uniform'" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()
