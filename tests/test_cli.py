"""One way to say things: every script's --help shows its defaults, --device means the same everywhere,
used output folders are refused alike, and optional packages stay optional."""
import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import distill
import export
import predict
import support
import teacher
import train_det as td
import train_pose
import train_seg

SCRIPTS = {"train_det.py": td.main, "train_seg.py": train_seg.main, "train_pose.py": train_pose.main,
           "teacher.py": teacher.main, "distill.py": distill.main, "export.py": export.main, "predict.py": predict.main}


def help_of(script, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS[script](["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_every_default_in_one_usage_block(script, capsys, monkeypatch):
    out = help_of(script, capsys, monkeypatch)
    assert out.count("usage:") == 1 and out.startswith(f"usage: {script} ")
    entries = {e.split()[0]: " ".join(e.split()) for e in re.split(r"\n(?=  -)", out.split("options:\n")[1])}
    usage = " ".join(out.split("\n\n")[0].split())
    required = set(re.findall(r"(?<!\[)(--[\w-]+) [A-Z]", usage))
    for option, entry in entries.items():
        if option in required:
            continue
        takes_value = len(entry.split()) > 1 and re.fullmatch(r"[A-Z_]+|\{.*\}|N|DIR|JSON|FILE|CHECKPOINT",
                                                                  entry.split()[1].rstrip(","))
        if option.startswith("--") and takes_value:  # a flag has nothing to default to: absent means off
            assert "default" in entry, entry
    assert "--device" not in entries or "default: cuda when available, else cpu" in entries["--device"]
    assert script != "teacher.py" or "--model" not in entries


def test_device_is_read_alike_everywhere():
    assert support.device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert support.device("cpu") == torch.device("cpu")
    for bad, message in (("gpu", "expected cpu, cuda or cuda:N"), ("mps", "expected cpu, cuda or cuda:N")):
        with pytest.raises(ValueError, match=f"--device {bad}: .*{message}"):
            support.device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda:1: no CUDA GPU is visible"):
            support.device("cuda:1")
    assert predict.parse_args(["--weights", "w.pth", "--source", "x"]).device is None  # support.device's default


def test_predict_refuses_a_used_output_dir_unless_overwrite(tmp_path, capsys):
    cfg = dict(td.demo_config(), eval_spatial_size=[64, 64])
    torch.save({"model": td.model.build_model(cfg).state_dict(), "config": cfg}, tmp_path / "net.pth")
    from PIL import Image
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    argv = ["--weights", str(tmp_path / "net.pth"), "--source", str(tmp_path / "a.png"), "--output-dir",
            str(tmp_path / "out")]
    predict.main(argv)
    before = (tmp_path / "out" / "predictions.jsonl").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        predict.main(argv)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and line.startswith("predict.py: error: --output-dir ") and \
        line.endswith("already holds predictions (predictions.jsonl): choose another folder, or replace them with "
                      "--overwrite"), line
    assert (tmp_path / "out" / "predictions.jsonl").read_bytes() == before
    assert predict.main(argv + ["--overwrite"])["images"] == 1


def test_export_without_weights_refuses_unless_random_weights(tmp_path, capsys):
    config = tmp_path / "net.json"
    config.write_text(json.dumps(dict(td.demo_config(), eval_spatial_size=[64, 64])))
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--model", str(config), "--onnx", str(tmp_path / "net.onnx")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith(
        "export.py: error: give --weights (a checkpoint or a preset name), or --random-weights"), err
    assert not (tmp_path / "net.onnx").exists()
    export.main(["--model", str(config), "--onnx", str(tmp_path / "net.onnx"), "--random-weights", "--threads", "1"])
    assert (tmp_path / "net.onnx").is_file()


NO_AV = "import sys; sys.modules['av'] = None; sys.argv = sys.argv[1:]; import runpy; runpy.run_path(sys.argv[0], run_name='__main__')"


def test_commands_run_without_pyav_and_a_video_gets_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-c", NO_AV, str(ROOT / "train_det.py"), "--help"], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0 and "usage: train_det.py" in out.stdout, out.stderr
    cfg = dict(td.demo_config(), eval_spatial_size=[64, 64])
    torch.save({"model": td.model.build_model(cfg).state_dict(), "config": cfg}, tmp_path / "net.pth")
    (tmp_path / "clip.mp4").write_bytes(b"not decoded: PyAV is missing")
    out = subprocess.run([sys.executable, "-c", NO_AV, str(ROOT / "predict.py"), "--weights", str(tmp_path / "net.pth"),
                          "--source", str(tmp_path / "clip.mp4"), "--output-dir", str(tmp_path / "out"),
                          "--device", "cpu"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (f"predict.py: error: --source {tmp_path / 'clip.mp4'} (a video) "
                                                   f"needs the av package: pip install av")
