"""launch_mixed_precision_server.py / start_mixed_precision_server.sh / sglang-mp launch and plandir."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serving_harness import mix_config
from sglang_mixed_precision.core.errors import MixedPrecisionError, ValidationErrors
from sglang_mixed_precision.serving import launcher

REPO = Path(__file__).resolve().parents[1]
SERVER = [sys.executable, "-m", "sglang.launch_server"]


def test_without_enable_flag_arguments_reach_sglang_untouched():
    argv = ["--model-path", "/models/x", "--tp", "2", "--port", "30001", "--attention-backend", "triton", "--weird=1"]
    assert launcher.sglang_command(argv) == SERVER + argv
    assert launcher.sglang_command(argv + ["--print-command"]) == SERVER + argv


def test_mixed_flags_without_enable_are_refused():
    with pytest.raises(MixedPrecisionError) as e:
        launcher.sglang_command(["--model-path", "m", "--mixed-precision-config", "c.yaml"])
    assert e.value.code == "launch_flag_without_enable"


def test_enabled_launch_validates_prints_and_serves_the_plan_dir(tiny_qwen3_moe, tmp_path):
    cfg = mix_config(str(tiny_qwen3_moe), "attn_fp8_mlp_int4")
    bf16 = cfg.parent / "fp16"
    out = io.StringIO()
    cmd = launcher.sglang_command(
        [
            "--enable-mixed-precision",
            "--mixed-precision-config",
            str(cfg),
            "--model-path",
            str(bf16),
            "--host",
            "127.0.0.1",
            "--port",
            "30007",
            "--tp-size",
            "2",
            "--dp-size",
            "2",
            "--max-running-requests",
            "8",
            "--max-total-tokens",
            "4096",
            "--dtype",
            "bfloat16",
            "--plan-dir",
            str(tmp_path / "plan"),
            "--attention-backend",
            "triton",
            "--disable-cuda-graph",
            "--mem-fraction-static",
            "0.5",
        ],
        out=out,
    )
    plan_dir = str((tmp_path / "plan").resolve())
    assert cmd == SERVER + [
        "--model-path",
        plan_dir,
        "--host",
        "127.0.0.1",
        "--port",
        "30007",
        "--tp-size",
        "2",
        "--dp-size",
        "2",
        "--max-running-requests",
        "8",
        "--max-total-tokens",
        "4096",
        "--dtype",
        "bfloat16",
        "--attention-backend",
        "triton",
        "--disable-cuda-graph",
        "--mem-fraction-static",
        "0.5",
    ]
    printed = out.getvalue()
    assert "Per TP rank (tp_size 2" in printed and "gptq-int4-g128" in printed and "fp8-block128" in printed
    qc = json.loads((tmp_path / "plan" / "config.json").read_text())["quantization_config"]
    assert qc == {
        "quant_method": "mixed_precision",
        "config_path": str(cfg.resolve()),
        "tp_size": 2,
        "int4_moe_kernel": "auto",
        "skeleton": "fp16",
    }


def test_plan_errors_fail_before_sglang_starts(tiny_qwen3_moe, tmp_path, capsys):
    cfg = mix_config(str(tiny_qwen3_moe), "attn_fp8_mlp_int4")
    with pytest.raises(ValidationErrors) as e:
        launcher.sglang_command(
            [
                "--enable-mixed-precision",
                "--mixed-precision-config",
                str(cfg),
                "--tp-size",
                "3",
                "--plan-dir",
                str(tmp_path / "plan"),
            ]
        )
    assert "tp_indivisible" in e.value.codes
    assert not (tmp_path / "plan").exists()
    rc = launcher.main(["--enable-mixed-precision", "--mixed-precision-config", str(cfg), "--tp-size", "3"])
    assert rc == 2 and "tp_indivisible" in capsys.readouterr().err


def test_launch_argument_errors(tiny_qwen3, tmp_path):
    cfg = mix_config(str(tiny_qwen3), "attn_bf16_mlp_fp8")
    cases = {
        "launch_no_config": ["--enable-mixed-precision", "--model-path", str(tmp_path)],
        "launch_model_not_a_source": [
            "--enable-mixed-precision",
            "--mixed-precision-config",
            str(cfg),
            "--model-path",
            str(tiny_qwen3),
        ],
        "launch_pp_unsupported": ["--enable-mixed-precision", "--mixed-precision-config", str(cfg), "--pp-size", "2"],
    }
    for code, argv in cases.items():
        with pytest.raises(MixedPrecisionError) as e:
            launcher.sglang_command(argv, out=io.StringIO())
        assert e.value.code == code, argv


def test_plan_dir_as_model_path_needs_no_config_flag(tiny_qwen3, tmp_path):
    from sglang_mixed_precision.serving.plandir import make_plan_dir

    _, path = make_plan_dir(mix_config(str(tiny_qwen3), "attn_bf16_mlp_fp8"), tmp_path / "first")
    cmd = launcher.sglang_command(
        ["--enable-mixed-precision", "--model-path", str(path), "--plan-dir", str(tmp_path / "again")],
        out=io.StringIO(),
    )
    assert cmd[cmd.index("--model-path") + 1] == str((tmp_path / "again").resolve())


def test_relaunch_from_a_plan_dir_keeps_its_skeleton_and_kernel(tiny_qwen3_moe, tmp_path):
    import yaml

    root = mix_config(str(tiny_qwen3_moe), "attn_fp8_mlp_int4").parent
    cfg = root / "two_16bit_sources.yaml"  # "orig" gives the model only when --model-path names it
    cfg.write_text(
        yaml.safe_dump(
            {
                "mixed_precision": {
                    "sources": {"fp16": "./fp16", "orig": str(tiny_qwen3_moe), "int4": "./int4"},
                    "default": "fp16",
                    "rules": [{"match": "model.layers.*.mlp.experts.*", "source": "int4"}],
                }
            }
        )
    )
    first, again, other = tmp_path / "first", tmp_path / "again", tmp_path / "other"
    launcher.sglang_command(
        [
            "--enable-mixed-precision",
            "--mixed-precision-config",
            str(cfg),
            "--model-path",
            str(tiny_qwen3_moe),
            "--int4-moe-kernel",
            "marlin",
            "--plan-dir",
            str(first),
        ],
        out=io.StringIO(),
    )
    launcher.sglang_command(
        ["--enable-mixed-precision", "--model-path", str(first), "--plan-dir", str(again)], out=io.StringIO()
    )
    qc = json.loads((again / "config.json").read_text())["quantization_config"]
    assert (qc["skeleton"], qc["int4_moe_kernel"], qc["config_path"]) == ("orig", "marlin", str(cfg.resolve()))
    launcher.sglang_command(
        [
            "--enable-mixed-precision",
            "--model-path",
            str(first),
            "--int4-moe-kernel",
            "wna16",
            "--plan-dir",
            str(other),
        ],
        out=io.StringIO(),
    )
    assert json.loads((other / "config.json").read_text())["quantization_config"]["int4_moe_kernel"] == "wna16"


def test_plan_dir_refuses_to_overwrite_a_model(tiny_qwen3):
    from sglang_mixed_precision.serving.plandir import make_plan_dir

    cfg = mix_config(str(tiny_qwen3), "attn_bf16_mlp_fp8")
    with pytest.raises(MixedPrecisionError) as e:
        make_plan_dir(cfg, tiny_qwen3)
    assert e.value.code == "plan_dir_target"


@pytest.mark.parametrize(
    "qc, needle",
    [
        ({"quant_method": "mixed_precision"}, "needs 'config_path' (the mixed YAML)"),
        (
            {"quant_method": "mixed_precision", "config_path": "m.yaml", "int4_moe_kernel": "exllama"},
            "int4_moe_kernel 'exllama' is not one of ('auto', 'marlin', 'wna16')",
        ),
    ],
)
def test_plan_dir_settings_errors(qc, needle):
    from sglang_mixed_precision.serving.settings import PlanSettings

    with pytest.raises(MixedPrecisionError) as e:
        PlanSettings.from_quantization_config(qc)
    assert e.value.code == "plan_dir_invalid" and needle in e.value.detail
    assert e.value.where == "config.json quantization_config"


def test_plan_dir_settings_round_trip():
    from sglang_mixed_precision.serving.settings import PlanSettings

    settings = PlanSettings("/m/mix.yaml", 2, "fp16", "marlin")
    assert PlanSettings.from_quantization_config(settings.to_quantization_config()) == settings
    assert PlanSettings.from_quantization_config({"config_path": "m.yaml"}).int4_moe_kernel == "auto"


def test_plugin_must_be_installed_and_allowed(monkeypatch):
    launcher.check_plugin_installed()  # the package is installed with its entry point
    with monkeypatch.context() as m:
        m.setattr(launcher, "entry_points", lambda group: [])
        with pytest.raises(MixedPrecisionError) as e:
            launcher.check_plugin_installed()
        assert e.value.code == "plugin_not_installed" and "'mixed_precision' is not installed" in e.value.detail
    monkeypatch.setenv("SGLANG_PLUGINS", "some_other_plugin")
    with pytest.raises(MixedPrecisionError) as e:
        launcher.check_plugin_installed()
    assert e.value.code == "plugin_disabled"


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120, **kw)


def test_scripts_take_the_same_flags_and_do_not_import_sglang(tiny_qwen3, tmp_path):
    cfg = mix_config(str(tiny_qwen3), "attn_bf16_mlp_fp8")
    flags = [
        "--enable-mixed-precision",
        "--mixed-precision-config",
        str(cfg),
        "--port",
        "30009",
        "--plan-dir",
        str(tmp_path / "plan"),
        "--print-command",
    ]
    py = _run([sys.executable, "launch_mixed_precision_server.py", *flags])
    sh = _run(["bash", "start_mixed_precision_server.sh", *flags])
    assert py.returncode == 0 and sh.returncode == 0, py.stderr + sh.stderr
    # Same command, whichever python3 the shell script found.
    assert py.stdout.splitlines()[-1].split()[1:] == sh.stdout.splitlines()[-1].split()[1:]
    assert py.stdout.splitlines()[-1].endswith(f"--model-path {(tmp_path / 'plan').resolve()} --port 30009")
    probe = _run(
        [
            sys.executable,
            "-c",
            "import sys; from sglang_mixed_precision.serving import launcher; "
            f"launcher.sglang_command({flags[:-1]!r}); print('sglang' in sys.modules)",
        ]
    )
    assert probe.stdout.strip().splitlines()[-1] == "False", probe.stderr


def test_cli_launch_and_plandir_commands(tiny_qwen3, tmp_path, capsys):
    from sglang_mixed_precision.cli import main

    cfg = mix_config(str(tiny_qwen3), "per_layer")
    assert main(["plandir", "--config", str(cfg), "--output", str(tmp_path / "pd"), "--tp-size", "2"]) == 0
    assert "python -m sglang.launch_server --model-path" in capsys.readouterr().out
    assert json.loads((tmp_path / "pd" / "config.json").read_text())["quantization_config"]["tp_size"] == 2
    assert (
        main(
            [
                "launch",
                "--enable-mixed-precision",
                "--mixed-precision-config",
                str(cfg),
                "--plan-dir",
                str(tmp_path / "pd2"),
                "--print-command",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(sys.executable)


# ---- managed restart -------------------------------------------------------------------------
def _supervisor(tmp_path, scripts: dict[str, str], refuse: set[str]):
    """A Supervisor whose 'server' for config C runs ``scripts[C]`` (a python snippet)."""
    calls = []

    def command_for(args):
        calls.append(Path(args.mixed_precision_config).name)
        if calls[-1] in refuse:
            raise MixedPrecisionError("validation_failed", f"{calls[-1]} does not plan")
        return [sys.executable, "-c", scripts[calls[-1]]]

    args, _ = launcher.parse(["--enable-mixed-precision", "--mixed-precision-config", str(tmp_path / "a.yaml")])
    first = command_for(args)
    sup = launcher.Supervisor(args, command_for, first, tmp_path / "restart.json", poll=0.05, out=io.StringIO())
    return sup, calls


def _request_restart_when_running(sup, config: Path):
    import threading
    import time as _time

    from sglang_mixed_precision.serving.restart import request_restart

    def later():
        while sup.proc is None:
            _time.sleep(0.05)
        _time.sleep(0.3)
        request_restart("mixed_precision: {}", config, inline=False, restart_file=str(sup.restart_file))

    threading.Thread(target=later, daemon=True).start()


def test_supervisor_restarts_the_server_on_a_valid_request(tmp_path):
    sup, calls = _supervisor(
        tmp_path, {"a.yaml": "import time; time.sleep(60)", "b.yaml": "raise SystemExit(3)"}, set()
    )
    _request_restart_when_running(sup, tmp_path / "b.yaml")
    assert sup.run() == 3  # the restarted server's exit code
    assert calls == ["a.yaml", "b.yaml"]
    assert Path(sup.args.mixed_precision_config).name == "b.yaml"
    assert "restart requested with" in sup.out.getvalue()
    assert not sup.restart_file.exists()


def test_supervisor_keeps_serving_when_the_new_config_is_refused(tmp_path):
    sup, calls = _supervisor(tmp_path, {"a.yaml": "import time; time.sleep(1.5)"}, {"bad.yaml"})
    _request_restart_when_running(sup, tmp_path / "bad.yaml")
    assert sup.run() == 0  # the first server ran to its end
    assert calls == ["a.yaml", "bad.yaml"]
    assert "the new config was refused, the server keeps running" in sup.out.getvalue()


def test_plan_dir_refuses_sources_without_a_tokenizer(tiny_qwen3, tmp_path):
    """SGLang serves the plan directory's tokenizer: no source has one -> refused, naming the skeleton."""
    from sglang_mixed_precision.serving.plandir import make_plan_dir

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in tiny_qwen3.iterdir():
        if not f.name.startswith("tokenizer"):
            (bare / f.name).symlink_to(f)
    cfg = tmp_path / "mix.yaml"
    cfg.write_text(f"mixed_precision:\n  fp16_path: {bare}\n")
    with pytest.raises(MixedPrecisionError) as e:
        make_plan_dir(cfg, tmp_path / "plan")
    assert e.value.code == "plan_dir_no_tokenizer" and e.value.detail == "no source holds tokenizer files"
    assert e.value.where == str(bare)
    assert e.value.fix == "copy the model's tokenizer files into its 16-bit directory"
    assert not (tmp_path / "plan").exists()  # refused before anything was written


@pytest.mark.parametrize(
    "flag,value,needle",
    [
        ("--tp-size", "0", "--tp-size '0' is not valid: it takes an integer of at least 1"),
        ("--tp", "-2", "--tp-size '-2' is not valid"),
        ("--dp-size", "0", "--dp-size '0' is not valid: it takes an integer of at least 1"),
        ("--pp-size", "0", "--pp-size '0' is not valid"),
        ("--port", "99999", "--port '99999' is not valid: it takes an integer from 1 to 65535"),
        ("--port", "0", "--port '0' is not valid"),
        ("--port", "http", "--port 'http' is not valid"),
        ("--port", "80.5", "--port '80.5' is not valid"),
        ("--max-running-requests", "0", "--max-running-requests '0' is not valid"),
        ("--max-total-tokens", "-1", "--max-total-tokens '-1' is not valid"),
        ("--tp-size", "two", "--tp-size 'two' is not valid"),
        ("--dtype", "fp8", "--dtype 'fp8' is not one SGLang takes"),
    ],
)
def test_bad_numbers_are_refused_before_anything_is_written(tiny_qwen3, tmp_path, capsys, flag, value, needle):
    cfg = mix_config(str(tiny_qwen3), "attn_bf16_mlp_fp8")
    plan_dir = tmp_path / "plan"
    argv = ["--enable-mixed-precision", "--mixed-precision-config", str(cfg), "--plan-dir", str(plan_dir), flag, value]
    with pytest.raises(MixedPrecisionError) as e:
        launcher.sglang_command(argv, out=io.StringIO())
    assert e.value.code == "bad_argument" and needle in str(e.value) and e.value.fix
    assert not plan_dir.exists()
    assert launcher.main([*argv, "--print-command"]) == 2  # an error message, not a traceback or usage
    assert needle in capsys.readouterr().err and not plan_dir.exists()


def test_every_bad_number_is_named_at_once(tiny_qwen3, tmp_path):
    cfg = mix_config(str(tiny_qwen3), "attn_bf16_mlp_fp8")
    argv = ["--enable-mixed-precision", "--mixed-precision-config", str(cfg), "--tp-size", "0", "--port", "70000"]
    with pytest.raises(ValidationErrors) as e:
        launcher.sglang_command(argv + ["--plan-dir", str(tmp_path / "p")], out=io.StringIO())
    assert e.value.codes == ["bad_argument", "bad_argument"]
    assert "--port '70000'" in str(e.value) and "--tp-size '0'" in str(e.value)


def test_good_numbers_reach_sglang_as_integers(tiny_qwen3, tmp_path):
    cfg = mix_config(str(tiny_qwen3), "attn_bf16_mlp_fp8")
    cmd = launcher.sglang_command(
        ["--enable-mixed-precision", "--mixed-precision-config", str(cfg), "--plan-dir", str(tmp_path / "p")]
        + ["--port", " 30001", "--tp", "2", "--max-total-tokens", "4096", "--dtype", "bfloat16"],
        out=io.StringIO(),
    )
    assert cmd[cmd.index("--port") + 1] == "30001" and cmd[cmd.index("--tp-size") + 1] == "2"
    assert cmd[cmd.index("--max-total-tokens") + 1] == "4096"


def test_stock_sglang_gets_its_arguments_unread():
    argv = ["--model-path", "/m", "--port", "99999", "--tp-size", "zero"]  # SGLang's own checks apply
    assert launcher.sglang_command(argv) == SERVER + argv


def test_sglang_entry_serve_builds_sglang_serve_commands():
    argv = ["--model-path", "/m", "--port", "30001", "--weird=1"]
    sglang = str(Path(sys.executable).with_name("sglang"))
    assert launcher.sglang_command(["--sglang-entry", "serve", *argv]) == [sglang, "serve", *argv]
    assert launcher.sglang_command([*argv, "--sglang-entry=serve", "--print-command"]) == [sglang, "serve", *argv]
    assert launcher.sglang_command(["--sglang-entry", "launch_server", *argv]) == SERVER + argv


# Runs `sglang serve ...` (SGLang's own CLI) up to the point where the server would start, then reports
# what that server would be: the server args SGLang parsed, and what the plugin makes of them.
SERVE_PROBE = """
import json, sys
import sglang.launch_server as launch_server

def run_server(server_args):
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.plugins.hook_registry import HookRegistry
    from sglang.srt.server_args import QUANTIZATION_CHOICES
    from sglang_mixed_precision.serving.hooks import HOOKS
    from sglang_mixed_precision.serving.service import active_mix_from_model_path

    active = active_mix_from_model_path(server_args.model_path, server_args.tp_size)
    print("PROBE " + json.dumps({
        "model_path": server_args.model_path,
        "quantization": ModelConfig.from_server_args(server_args).quantization,
        "choice": "mixed_precision" in QUANTIZATION_CHOICES,
        "hooks": all(any(h is hook.function for _, h, _ in HookRegistry._hooks[hook.target]) for hook in HOOKS),
        "config_path": str(active.config_path),
        "max_total_tokens": server_args.max_total_tokens,
    }))

launch_server.run_server = run_server
from sglang.cli.main import main
main()
"""


def test_sglang_serve_serves_the_plan_directory(tiny_qwen3, tmp_path):
    """`sglang serve` as the launcher starts it: SGLang's CLI picks its LLM server for the plan
    directory, loads the plugin first, and the server it would start is the mix."""
    cfg = mix_config(str(tiny_qwen3), "attn_bf16_mlp_fp8")
    plan_dir = tmp_path / "plan"
    argv = ["--enable-mixed-precision", "--mixed-precision-config", str(cfg), "--plan-dir", str(plan_dir)]
    cmd = launcher.sglang_command(
        [*argv, "--sglang-entry", "serve", "--max-total-tokens", "4096", "--device", "cpu"], out=io.StringIO()
    )
    assert cmd[:2] == [str(Path(sys.executable).with_name("sglang")), "serve"] and Path(cmd[0]).is_file()
    assert cmd[cmd.index("--model-path") + 1] == str(plan_dir)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "python"), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", SERVE_PROBE, *cmd[1:]], capture_output=True, text=True, env=env)
    probes = [line for line in run.stdout.splitlines() if line.startswith("PROBE ")]
    assert probes, run.stdout[-2000:] + run.stderr[-4000:]
    seen = json.loads(probes[0][len("PROBE ") :])
    assert seen == {
        "model_path": str(plan_dir),
        "quantization": "mixed_precision",
        "choice": True,
        "hooks": True,
        "config_path": str(cfg),
        "max_total_tokens": 4096,
    }
