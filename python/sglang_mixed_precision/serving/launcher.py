"""``launch_mixed_precision_server.py`` / ``sglang-mp launch``: validate the plan, then start SGLang.

With ``--enable-mixed-precision`` the launcher resolves and validates the mixed config for the
requested ``--tp-size`` (every rank's shapes against its kernels) and fails fast with the plan's
errors; otherwise it prints the plan's tables, writes the plan directory and runs
``python -m sglang.launch_server`` on it (or ``sglang serve`` with ``--sglang-entry serve``) with
every other argument passed through unchanged, supervising it for managed restarts
(:class:`Supervisor`). Without ``--enable-mixed-precision`` the arguments go to SGLang untouched
(the process becomes it): stock SGLang.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from importlib.metadata import entry_points
from pathlib import Path

from ..core.errors import ErrorCode, MixedPrecisionError, raise_all
from .client import stop_server
from .settings import DEFAULT_INT4_MOE_KERNEL, INT4_MOE_KERNELS

SGLANG_SERVER = ("-m", "sglang.launch_server")
# SGLang's entry points that serve a model directory: both parse the same server arguments.
SGLANG_ENTRIES = ("launch_server", "serve")
PLUGIN_GROUP, PLUGIN_NAME = "sglang.srt.plugins", "mixed_precision"
# The launcher's flags that only mean something with --enable-mixed-precision (SGLang never sees them).
MIX_ONLY_FLAGS = ("--mixed-precision-config", "--plan-dir", "--int4-moe-kernel")
# The launcher's own flags with a value, read in both modes and never handed on.
LAUNCHER_FLAGS = ("--sglang-entry",)
# Flags the launcher reads (for the plan) and hands on to SGLang: (dest, SGLang flag, aliases).
SHARED_FLAGS = (
    ("model_path", "--model-path", ("--model",)),
    ("host", "--host", ()),
    ("port", "--port", ()),
    ("tp_size", "--tp-size", ("--tensor-parallel-size", "--tp")),
    ("dp_size", "--dp-size", ("--data-parallel-size", "--dp")),
    ("pp_size", "--pp-size", ("--pipeline-parallel-size",)),
    ("max_running_requests", "--max-running-requests", ()),
    ("max_total_tokens", "--max-total-tokens", ()),
    ("dtype", "--dtype", ()),
)
# The numbers among them: dest -> (smallest, largest accepted). SGLang uses port..port+N itself.
NUMERIC_FLAGS = {
    "port": (1, 65535),
    "tp_size": (1, None),
    "dp_size": (1, None),
    "pp_size": (1, None),
    "max_running_requests": (1, None),
    "max_total_tokens": (1, None),
}
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")  # SGLang's --dtype choices


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mixed precision (any other flag is passed to SGLang unchanged)")
    g.add_argument(
        "--enable-mixed-precision",
        action="store_true",
        help="serve the mix of --mixed-precision-config; without it this is `python -m sglang.launch_server`",
    )
    g.add_argument("--mixed-precision-config", metavar="YAML", help="the mixed-precision config")
    g.add_argument(
        "--plan-dir", metavar="DIR", help="where to write the plan directory SGLang serves (default: a temp dir)"
    )
    g.add_argument(
        "--int4-moe-kernel",
        choices=INT4_MOE_KERNELS,
        default=None,
        help="int4 experts: auto (default: marlin when the experts' per-rank shapes allow, else wna16), marlin "
        "(GPTQ-Marlin MoE, scales in the model dtype) or wna16 (SGLang's Triton W4A16 method); a plan "
        "directory given as --model-path keeps its own",
    )
    g.add_argument(
        "--sglang-entry",
        choices=SGLANG_ENTRIES,
        default="launch_server",
        help="how SGLang is started: `python -m sglang.launch_server` (default) or `sglang serve` "
        "(the same server arguments)",
    )
    g.add_argument(
        "--print-command",
        action="store_true",
        help="validate, write the plan directory, print the SGLang command, exit",
    )
    s = p.add_argument_group("SGLang server arguments the plan depends on")
    for dest, flag, aliases in SHARED_FLAGS:
        # read as text: check_flags refuses bad values with the project's errors (argparse would exit)
        s.add_argument(flag, *aliases, dest=dest, default=None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch_mixed_precision_server.py", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    add_arguments(p)
    return p


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(launcher arguments, arguments for SGLang that the launcher does not read)."""
    return build_parser().parse_known_args(argv)


def stock_argv(argv: list[str]) -> list[str]:
    """Without --enable-mixed-precision: SGLang gets the arguments as given (minus the launcher's own)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in LAUNCHER_FLAGS:
            skip = True  # and its value
        elif a != "--print-command" and not a.startswith(tuple(f + "=" for f in LAUNCHER_FLAGS)):
            out.append(a)
    return out


def server_program(entry: str) -> list[str]:
    """The start of the command for SGLang's entry point ``entry`` (one of :data:`SGLANG_ENTRIES`)."""
    if entry == "serve":
        script = Path(sys.executable).with_name("sglang")  # SGLang's console script, next to this Python
        if not script.is_file():
            raise MixedPrecisionError(
                ErrorCode.BAD_ARGUMENT,
                f"--sglang-entry serve: there is no `sglang` command next to {sys.executable}",
                where=str(script),
                fix="install SGLang into this environment, or use --sglang-entry launch_server",
            )
        return [str(script), "serve"]
    return [sys.executable, *SGLANG_SERVER]


def shared_argv(args: argparse.Namespace, model_path: str) -> list[str]:
    out = ["--model-path", model_path]
    for dest, flag, _ in SHARED_FLAGS:
        value = getattr(args, dest)
        if dest != "model_path" and value is not None:
            out += [flag, str(value)]
    return out


def check_flags(args: argparse.Namespace) -> None:
    """Turn the numeric flags into ints, refusing (all at once, naming each flag) what SGLang cannot
    serve with: before the plan directory is written or SGLang is started."""
    flags = {dest: flag for dest, flag, _ in SHARED_FLAGS}
    problems = []
    for dest, (low, high) in NUMERIC_FLAGS.items():
        text = getattr(args, dest)
        if text is None:
            continue
        value = _integer(text)
        if value is None or value < low or (high is not None and value > high):
            accepted = f"from {low} to {high}" if high is not None else f"of at least {low}"
            problems.append(
                MixedPrecisionError(
                    ErrorCode.BAD_ARGUMENT,
                    f"{flags[dest]} {text!r} is not valid: it takes an integer {accepted}",
                    where=flags[dest],
                    fix=f"pass {flags[dest]} with an integer {accepted}",
                )
            )
            continue
        setattr(args, dest, value)
    if args.dtype is not None and args.dtype not in DTYPES:
        problems.append(
            MixedPrecisionError(
                ErrorCode.BAD_ARGUMENT,
                f"--dtype {args.dtype!r} is not one SGLang takes",
                where="--dtype",
                fix=f"pass one of {', '.join(DTYPES)}",
            )
        )
    raise_all(problems)


def _integer(text) -> int | None:
    if isinstance(text, int):  # already checked (a supervisor's restart reuses the arguments)
        return text
    try:
        return int(str(text).strip(), 10)
    except ValueError:
        return None


def check_plugin_installed() -> None:
    """SGLang's workers only see the mix through the entry point of an installed package."""
    names = {ep.name for ep in entry_points(group=PLUGIN_GROUP)}
    if PLUGIN_NAME not in names:
        raise MixedPrecisionError(
            ErrorCode.PLUGIN_NOT_INSTALLED,
            "the sglang.srt.plugins entry point 'mixed_precision' is not installed",
            fix="install the package into SGLang's environment: pip install -e <repo> (or pip install sglang-mixed-precision)",
        )
    allowed = os.environ.get("SGLANG_PLUGINS", "")
    if allowed and PLUGIN_NAME not in {x.strip() for x in allowed.split(",")}:
        raise MixedPrecisionError(
            ErrorCode.PLUGIN_DISABLED,
            f"SGLANG_PLUGINS={allowed!r} does not list 'mixed_precision'",
            fix="add mixed_precision to SGLANG_PLUGINS or unset it",
        )


def resolve_config(args: argparse.Namespace) -> tuple[Path, str | None, str]:
    """(YAML path, skeleton label or None, int4 MoE kernel). --model-path names the mix's model or a
    plan directory; a plan directory's saved skeleton and kernel are kept unless flags change them."""
    from .plandir import saved_settings

    model = Path(args.model_path).expanduser() if args.model_path else None
    saved = saved_settings(model) if model is not None else None
    if args.mixed_precision_config:
        config = Path(args.mixed_precision_config).expanduser().resolve()
    elif saved is not None:
        config = Path(saved.config_path)
    else:
        raise MixedPrecisionError(
            ErrorCode.LAUNCH_NO_CONFIG,
            "--enable-mixed-precision needs --mixed-precision-config",
            fix="pass --mixed-precision-config <yaml> (or --model-path <plan directory>)",
        )
    kernel = args.int4_moe_kernel or (saved.int4_moe_kernel if saved else DEFAULT_INT4_MOE_KERNEL)
    if model is None:
        return config, None, kernel
    if saved is not None:  # its skeleton label belongs to its own YAML
        return config, saved.skeleton if Path(saved.config_path).resolve() == config else None, kernel
    return config, skeleton_label(config, model), kernel


def skeleton_label(config_path: Path, model: Path) -> str:
    """The label of the source at ``model``: it gives the served model its config.json."""
    from ..core.config import load_config

    cfg = load_config(config_path)
    target = model.resolve()
    for label, spec in cfg.sources.items():
        if Path(spec.path).resolve() == target:
            return label
    listed = ", ".join(f"{label}: {spec.path}" for label, spec in cfg.sources.items())
    raise MixedPrecisionError(
        ErrorCode.LAUNCH_MODEL_NOT_A_SOURCE,
        f"--model-path {model} is none of the config's sources ({listed})",
        where=str(config_path),
        fix="pass the mix's 16-bit model as --model-path, or omit it",
    )


def default_plan_dir(config: Path, skeleton: str | None, tp: int, kernel: str) -> Path:
    key = hashlib.sha256(f"{config}|{skeleton}|{tp}|{kernel}".encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / "sglang-mp-plans" / f"{config.stem}-tp{tp}-{key}"


def prepare_mixed(args: argparse.Namespace, out=sys.stdout) -> Path:
    """Validate the plan at the requested TP size, print it, write the plan directory."""
    from ..core.report import format_tables
    from .plandir import make_plan_dir

    if (args.pp_size or 1) > 1:
        raise MixedPrecisionError(
            ErrorCode.LAUNCH_PP_UNSUPPORTED,
            "pipeline parallelism is not supported with a mixed-precision plan",
            fix="use --tp-size (and --dp-size) instead of --pp-size",
        )
    config, skeleton, kernel = resolve_config(args)
    tp = args.tp_size or 1
    plan_dir = Path(args.plan_dir) if args.plan_dir else default_plan_dir(config, skeleton, tp, kernel)
    plan, path = make_plan_dir(config, plan_dir, tp_size=tp, skeleton=skeleton, int4_moe_kernel=kernel)
    print(format_tables(plan), file=out)
    print(
        f"\nplan directory: {path} (tp_size {tp}, dp_size {args.dp_size or 1}; int4 MoE kernel {kernel})",
        file=out,
        flush=True,
    )
    args.family_flags = family_flags(plan.geometry.model_type, out)
    return path


def family_flags(model_type: str, out=sys.stdout) -> list[str]:
    """SGLang flags the served family needs with a mix (architectures.py says which and why)."""
    from ..core.architectures import architecture_for

    arch = architecture_for(model_type)
    flags = []
    for flag, why in arch.server_flags() if arch else ():
        print(f"adding {flag}: {why}", file=out, flush=True)
        flags.append(flag)
    return flags


def sglang_command(argv: list[str], out=sys.stdout) -> list[str]:
    """The command that serves ``argv``: stock SGLang, or SGLang on the plan directory."""
    args, rest = parse(argv)
    if not args.enable_mixed_precision:
        given = [f for f in MIX_ONLY_FLAGS if any(a == f or a.startswith(f + "=") for a in argv)]
        if given:
            raise MixedPrecisionError(
                ErrorCode.LAUNCH_FLAG_WITHOUT_ENABLE,
                f"{', '.join(given)} given without --enable-mixed-precision",
                fix="add --enable-mixed-precision to serve the mix (or drop the flag for stock SGLang)",
            )
        return [*server_program(args.sglang_entry), *stock_argv(argv)]
    return mixed_command(args, rest, out)


def mixed_command(args: argparse.Namespace, rest: list[str], out=sys.stdout) -> list[str]:
    """Validate and write the plan of ``args``; the SGLang command serving it."""
    check_flags(args)
    check_plugin_installed()
    plan_dir = prepare_mixed(args, out)
    extra = [f for f in args.family_flags if f not in rest]
    return [*server_program(args.sglang_entry), *shared_argv(args, str(plan_dir)), *rest, *extra]


class _Stop(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class Supervisor:
    """Runs the mixed server and restarts it when its runtime asks for another config.

    ``POST /mixed_precision/reload`` with ``"restart": true`` (a change no in-place reload can do)
    writes a request to the file named by ``SGLANG_MP_RESTART_FILE``; the supervisor validates the
    new config like a fresh launch, stops the server and starts it on the new plan. An invalid
    config is reported and the running server is left alone.
    """

    def __init__(
        self,
        args: argparse.Namespace,
        command_for,
        first_command: list[str],
        restart_file: Path,
        *,
        poll: float = 1.0,
        out=sys.stdout,
    ):
        self.args, self.command_for, self.command = args, command_for, first_command
        self.restart_file, self.poll, self.out = Path(restart_file), poll, out
        self.proc: subprocess.Popen | None = None

    def run(self) -> int:
        from .restart import RESTART_FILE_ENV

        env = {**os.environ, RESTART_FILE_ENV: str(self.restart_file)}
        self.restart_file.unlink(missing_ok=True)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.proc = self._start(env)
            while True:
                rc = self.proc.poll()
                if rc is not None:
                    return rc
                self._maybe_restart(env)
                time.sleep(self.poll)
        except _Stop as stop:
            return 128 + stop.signum
        finally:
            if self.proc is not None:
                stop_server(self.proc, grace=30.0)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.restart_file.unlink(missing_ok=True)

    def _on_signal(self, signum, frame):
        raise _Stop(signum)

    def _start(self, env: dict) -> subprocess.Popen:
        print(f"starting: {shlex.join(self.command)}", file=self.out, flush=True)
        # Its own session: stopping it reaches SGLang's scheduler and detokenizer processes too.
        return subprocess.Popen(self.command, env=env, start_new_session=True)

    def _maybe_restart(self, env: dict) -> None:
        from .restart import read_restart_request

        try:
            request = read_restart_request(self.restart_file)
        except (MixedPrecisionError, ValueError) as e:
            print(f"error: ignoring the restart request: {e}", file=self.out, flush=True)
            self.restart_file.unlink(missing_ok=True)
            return
        if request is None:
            return
        self.restart_file.unlink(missing_ok=True)
        args = argparse.Namespace(**{**vars(self.args), "mixed_precision_config": request["config_path"]})
        print(f"restart requested with {request['config_path']}: validating", file=self.out, flush=True)
        try:
            command = self.command_for(args)
        except MixedPrecisionError as e:
            print(f"error: the new config was refused, the server keeps running: {e}", file=self.out, flush=True)
            return
        stop_server(self.proc, grace=30.0)
        self.args, self.command = args, command
        self.proc = self._start(env)


def restart_file_for(plan_dir_parent: Path) -> Path:
    return plan_dir_parent / f"restart-request-{os.getpid()}.json"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        build_parser().print_help()
        print("\nEvery other SGLang server argument is accepted: see `python -m sglang.launch_server --help`.")
        return 0
    args, rest = parse(argv)
    try:
        cmd = sglang_command(argv)
    except MixedPrecisionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_command:
        print(shlex.join(cmd))
        return 0
    if not args.enable_mixed_precision:
        os.execv(cmd[0], cmd)  # stock SGLang, as if started directly
    plan_dir = Path(cmd[cmd.index("--model-path") + 1])
    supervisor = Supervisor(args, lambda a: mixed_command(a, rest), cmd, restart_file_for(plan_dir.parent))
    return supervisor.run()
