"""The conversion driver: input checks, plan, then one streaming pass over the decoder layers.

Each unit (the non-layer tensors, then decoder layer 0, 1, ...) is read once from the input
shards, quantized for every requested output on ``--device`` and streamed into that output's
shards. With a GPU a reader thread loads the next unit onto it and a writer thread flushes the
outputs (overlap.py): up to three units are in flight, and the bounds of GPU memory and RAM are in
README_MIXED_PRECISION.md (converter section), measured by bench/gpu_convert_bench.py. On the
CPU (threads off) only the unit in flight is held. Peak RAM above the interpreter + libraries is then bounded by
    fp8 / rtn: 2 x the largest unit's 16-bit bytes + 48 bytes x the largest tensor's elements
    gptq:      4 x the largest unit + 64 bytes x the largest tensor's elements
               + 24 bytes x K_max^2 (Hessians / inverse Cholesky)
    + 1.5 KiB x the output tensors (names and headers kept for the shard index and resume state)
    + 64 MiB slack (allocator, writer buffer)
whose weight terms do not depend on the number of layers. Freed tensors are returned to the OS
after every unit (allocator.py): without that, glibc's heap kept up to ~100 MiB between units and
the peak varied run to run. bench/convert_memory.py measures it on a model several times larger.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..core.errors import ErrorCode, MixedPrecisionError
from ..core.formats import config_dtype
from . import files, ownership
from .allocator import pin_mmap_threshold
from .arguments import FORMATS, check_options, shard_bytes
from .device import claim, mark, peak_memory, resolve_device, side_stream, to_host, upload
from .fp8_block import DEFAULT_BLOCK, quantize_fp8_block
from .gptq_pack import GptqTensors, rtn_quantize
from .model_dir import SIDE_FILES, InputModel
from .outputs import (
    bytes_on_disk,
    copy_side_files,
    estimate_bytes,
    fp8_quantization_config,
    gptq_quantization_config,
    write_config,
    write_fp16,
)
from .overlap import BackgroundWriter, Prefetcher
from .plan import ConversionPlan, Unit, build_plan
from .verify import DEFAULT_MAX_ERROR, OutputCheck, OutputReader, check_output, format_check
from .writer import ShardedWriter

CONFIG_NAME = "mixed_precision_config.yaml"  # written by `sglang-mp convert --create_config`
REPORT_NAME = "convert_report.json"
FORMAT_VERSION = 2  # 2: the input's files (size, modification time) are part of the fingerprint


@dataclass
class ConvertOptions:
    model_path: str
    output_dir: str
    formats: tuple[str, ...] = FORMATS
    method: str = "gptq"  # int4: "gptq" (calibrated) or "rtn" (round to nearest)
    group_size: int = 128
    desc_act: bool = False
    damp_percent: float = 0.01
    calib_file: str | None = None
    nsamples: int = 128
    seqlen: int = 512
    min_expert_tokens: int = 32
    skip: list[str] = field(default_factory=list)
    overwrite: bool = False
    max_shard_size: str = "2GB"
    verify: bool = False
    check: bool = True  # reload and measure the outputs after writing
    max_error_fp8: float = DEFAULT_MAX_ERROR["fp8"]
    max_error_int4: float = DEFAULT_MAX_ERROR["int4"]
    progress: bool = True
    mixed_config: str | None = None  # YAML written to OUTPUT/CONFIG_NAME (`--create_config`)
    device: str | None = None  # "cuda" (the default with a GPU) or "cpu"; see device.py
    overlap: bool | None = None  # reader / writer threads; None: on with a GPU (see _overlap)
    expert_batch: int = 0  # experts per batched GPTQ pass: 0 automatic (all within a memory budget on a GPU, 1 on CPU)

    def fingerprint(self, model: InputModel) -> dict:
        """What must match for a rerun to reuse finished shards."""
        from .calibration import calibration_text  # raises calib_file_missing for a wrong --calib_file

        keys = ("method", "group_size", "desc_act", "damp_percent", "nsamples", "seqlen", "min_expert_tokens", "skip")
        calib = calibration_text(self.calib_file).encode() if self.calib_file else b"bundled"
        return {
            "version": FORMAT_VERSION,
            "input": str(Path(self.model_path).resolve()),
            "input_bytes": model.total_bytes,
            "input_files": input_stamp(model),
            "calib_sha1": hashlib.sha1(calib).hexdigest(),
            **{k: getattr(self, k) for k in keys},
        }


def input_stamp(model: InputModel) -> str:
    """The input's files as they are now (name, size, modification time): an input replaced or edited
    between two runs (a fine-tune of the same size) must not resume on the other's shards."""
    stamp = []
    for name in (*model.files, "config.json"):
        st = os.stat(model.path / name)
        stamp.append((name, st.st_size, st.st_mtime_ns))
    return hashlib.sha1(json.dumps(stamp).encode()).hexdigest()


@dataclass
class ConversionReport:
    output_dir: str
    seconds: float
    input_bytes: int
    checks: dict[str, OutputCheck] = field(default_factory=dict)
    int4_method: dict = field(default_factory=dict)  # what the int4 quantizer reports (RTN fallbacks, errors)
    resumed_shards: dict[str, int] = field(default_factory=dict)
    skipped_groups: list[str] = field(default_factory=list)
    device: str = "cpu"
    unit_seconds: dict[str, float] = field(default_factory=dict)  # per unit, as the main thread finished it
    peak_device_bytes: int | None = None  # torch.cuda.max_memory_allocated over the run (GPU only)
    peak_host_bytes: int | None = None  # the process's peak resident memory (Linux VmHWM)

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "checks"}
        d["checks"] = {f: {"errors": c.errors, "problems": c.problems} for f, c in self.checks.items()}
        return d


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- output directory ---------------------------------------------------------------------------
def fp16_can_link(model: InputModel, out: Path) -> bool:
    """fp16/ hard-links the input's shards when both are on one filesystem (then it costs no space)."""
    return os.stat(model.path).st_dev == os.stat(files.existing_ancestor(out)).st_dev


def prepare_output_dir(
    opts: ConvertOptions, model: InputModel, plan: ConversionPlan, fingerprint: dict
) -> tuple[Path, ownership.OwnerRecord, int]:
    """Check the output (overlap with the input, foreign files, another conversion, permissions, space)
    with nothing touched; then replace (--overwrite), resume or start it. Returns the output, its owner
    record and about how many bytes are left to write."""
    out = Path(opts.output_dir)
    formats = tuple(opts.formats)
    record = ownership.inspect_output(out, model.path, fingerprint, overwrite=opts.overwrite, side_files=SIDE_FILES)
    total = estimate_bytes(model, plan, formats, fp16_can_link(model, out))
    kept = bytes_on_disk(out, formats) if record is not None and not opts.overwrite else 0
    needed = max(total - kept, 0)
    files.check_space(out, needed)
    return out, ownership.take_output(out, record, fingerprint, overwrite=opts.overwrite), needed


# -- int4 methods -------------------------------------------------------------------------------
class RtnInt4:
    """Round-to-nearest symmetric int4: no calibration."""

    carries_activations = False  # a finished unit can be skipped on resume without reading it

    def __init__(self, group_size: int, device: torch.device | str = "cpu"):
        self.group_size = group_size
        self.device = torch.device(device)

    def quantize_unit(self, unit: Unit, tensors: dict[str, torch.Tensor]) -> dict[str, GptqTensors]:
        return {
            m: rtn_quantize(tensors[f"{m}.weight"].to(self.device), self.group_size) for m in unit.quantized_modules
        }

    def skip_unit(self, unit: Unit, tensors: dict[str, torch.Tensor], written: dict[str, torch.Tensor]) -> None:
        pass

    def report(self) -> dict:
        return {"method": "rtn"}


def make_int4_method(opts: ConvertOptions, model: InputModel, device: torch.device | str = "cpu"):
    if opts.method == "rtn":
        return RtnInt4(opts.group_size, device)
    if opts.method == "gptq":
        from .calibration import GptqInt4

        return GptqInt4(model, opts, log=_log, device=device)
    raise MixedPrecisionError(
        ErrorCode.BAD_METHOD, f"unknown int4 method {opts.method!r}", fix="use --method gptq or --method rtn"
    )


def make_int4(opts: ConvertOptions, model: InputModel, device: torch.device | str = "cpu"):
    """The int4 method, built before writing: GPTQ tokenizes its calibration text here (its errors come first)."""
    return make_int4_method(opts, model, device) if "int4" in opts.formats else None


# -- the pass over units ------------------------------------------------------------------------
def _fp8_tensors(
    plan: ConversionPlan, unit: Unit, tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    out = {}
    for name in unit.tensors:
        if name in unit.quantized_weights:
            module = name.rsplit(".", 1)[0]
            q, s = quantize_fp8_block(tensors[name].to(device), plan.fp8_block)
            out[f"{module}.weight"] = q
            out[f"{module}.weight_scale_inv"] = s
        else:
            out[name] = tensors[name]
    return out


def _int4_passthrough(unit: Unit, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: tensors[n] for n in unit.tensors if n not in unit.quantized_weights}


def _unit_done(unit: Unit, writers: dict[str, ShardedWriter]) -> bool:
    """A unit is done when every output already holds all of its tensors (resume)."""
    for fmt, w in writers.items():
        for name in unit.tensors:
            probe = name
            if fmt == "int4" and name in unit.quantized_weights:
                probe = f"{name.rsplit('.', 1)[0]}.qweight"
            if w.needs(probe):
                return False
    return True


def _read_written_int4(reader: OutputReader, unit: Unit) -> dict[str, torch.Tensor]:
    """Dequantized int4 weights of a finished unit, read back from its shards (resume of gptq)."""
    return {m: reader.gptq_weight(m) for m in unit.quantized_modules}


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="convert",
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
    )


def _unit_bytes(model: InputModel, unit: Unit) -> int:
    return sum(model.tensors[n].nbytes for n in unit.tensors)


READ_AHEAD = 1  # units the reader thread loads ahead of the one being quantized
WRITE_BEHIND = 2  # units of outputs waiting for the writer thread


def _overlap(opts: ConvertOptions, device: torch.device) -> bool:
    """Reader / writer threads: on with a GPU unless turned off; off on the CPU unless turned on
    (there the cores are busy quantizing, and the CPU memory bound counts one unit in flight)."""
    return device.type == "cuda" if opts.overlap is None else opts.overlap


def _load_unit(model: InputModel, unit: Unit, device: torch.device, stream) -> dict[str, torch.Tensor]:
    """The unit's tensors: the weights to quantize on the device, the rest on the host."""
    tensors = {n: model.read(n) for n in unit.tensors}
    model.release()  # unmap the input shards: their touched pages would otherwise stay resident
    upload(tensors, unit.quantized_weights, device, stream)
    return tensors


def _unit_outputs(
    plan: ConversionPlan, unit: Unit, tensors: dict[str, torch.Tensor], formats, int4, device
) -> list[tuple[str, str, torch.Tensor]]:
    """(format, tensor name, tensor) of everything the unit writes, in writing order."""
    out = []
    if "fp8" in formats:
        out += [("fp8", n, t) for n, t in _fp8_tensors(plan, unit, tensors, device).items()]
    if "int4" in formats:
        out += [("int4", n, t) for n, t in _int4_passthrough(unit, tensors).items()]
        for module, g in int4.quantize_unit(unit, tensors).items():
            out += [("int4", n, t) for n, t in g.as_dict(module).items()]
    return out


def _write_outputs(writers: dict[str, ShardedWriter], stream, item) -> None:
    outputs, ready = item
    for fmt, name, t in outputs:
        writers[fmt].add(name, to_host(t, stream, ready))


def _units_to_read(model: InputModel, plan: ConversionPlan, writers, int4, bar) -> list[tuple[Unit, bool]]:
    """(unit, already written) for every unit that must be read: not written yet, or written but
    GPTQ must carry its calibration activations through it (resume)."""
    todo = []
    for unit in plan.units:
        done = _unit_done(unit, writers)
        if done and not (int4 and int4.carries_activations):
            bar.update(_unit_bytes(model, unit))
        else:
            todo.append((unit, done))
    return todo


def run_units(
    model: InputModel,
    plan: ConversionPlan,
    opts: ConvertOptions,
    writers: dict[str, ShardedWriter],
    int4,
    device: torch.device = torch.device("cpu"),
    unit_seconds: dict[str, float] | None = None,
) -> None:
    bar = _progress_bar(model.total_bytes, opts.progress)
    threaded = _overlap(opts, device)
    read_stream, write_stream = (side_stream(device), side_stream(device)) if threaded else (None, None)
    todo = _units_to_read(model, plan, writers, int4, bar)
    written: OutputReader | None = None  # int4 shards of an earlier run (gptq resume), indexed before writing
    if any(done for _, done in todo):
        written = OutputReader(writers["int4"].out_dir, writers["int4"].weight_map())
    reader = Prefetcher(
        todo, lambda ud: _load_unit(model, ud[0], device, read_stream), depth=READ_AHEAD, threaded=threaded
    )
    flusher = BackgroundWriter(
        lambda item: _write_outputs(writers, write_stream, item), depth=WRITE_BEHIND, threaded=threaded
    )
    last = time.time()
    try:
        for (unit, done), tensors in reader:
            bar.set_postfix_str(unit.label)
            claim(tensors, read_stream)
            if done:  # gptq resume: carry the calibration activations through the written layer
                int4.skip_unit(unit, tensors, _read_written_int4(written, unit))
            else:
                outputs = _unit_outputs(plan, unit, tensors, writers, int4, device)
                flusher.submit((outputs, mark(device)))
                del outputs
            del tensors
            if written is not None:
                written.release()
            bar.update(_unit_bytes(model, unit))
            seconds, last = time.time() - last, time.time()
            if unit_seconds is not None:
                unit_seconds[unit.label] = round(seconds, 3)
            if not opts.progress:  # no bar: a line per unit says how far it is
                _log(f"convert: {unit.label} in {seconds:.2f} s")
        flusher.close()
    except BaseException:
        reader.close()
        flusher.abort()
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()


# -- entry point --------------------------------------------------------------------------------
def checked_input(opts: ConvertOptions) -> tuple[InputModel, ConversionPlan]:
    """The arguments, the input model and the plan: every check that reads but never writes."""
    check_options(opts)
    model = InputModel(opts.model_path)
    model.check_supported()
    model.check_not_quantized()
    model.check_complete()
    plan = build_plan(
        model, skip=opts.skip, group_size=opts.group_size if "int4" in opts.formats else None, fp8_block=DEFAULT_BLOCK
    )
    return model, plan


def convert(opts: ConvertOptions) -> ConversionReport:
    t0 = time.time()
    opts.formats = tuple(dict.fromkeys(opts.formats))
    model, plan = checked_input(opts)
    device = resolve_device(opts.device)  # a named error without the device, before anything is written
    fingerprint = opts.fingerprint(model)
    int4 = make_int4(opts, model, device)
    with files.output_errors(Path(opts.output_dir), 0):  # an unreadable or read-only output is named too
        out, record, needed = prepare_output_dir(opts, model, plan, fingerprint)  # the first write is here
    with files.output_errors(out, needed):
        report = write_outputs(opts, model, plan, fingerprint, int4, out, record, device)
    report.seconds = time.time() - t0
    report.peak_device_bytes, report.peak_host_bytes = peak_memory(device)
    with files.output_errors(out, 0):
        ownership.claim(out, record, REPORT_NAME)
        files.write_text(out / REPORT_NAME, json.dumps(report.to_json(), indent=1))
    if opts.verify:
        gate_verification(report, opts)
    return report


def _log_start(model: InputModel, plan: ConversionPlan, out: Path, device: torch.device) -> None:
    if not pin_mmap_threshold():
        _log(
            "convert: note: this C library's malloc cannot be told to return freed tensors to the OS "
            "(no glibc mallopt); peak memory can exceed the stated bound by what it keeps"
        )
    _log(
        f"convert: {model.architecture} {model.total_bytes / 2**20:.1f} MiB in {len(model.files)} shard(s), "
        f"{len(plan.quantized)} linear modules to quantize, {len(plan.units)} units on {device} -> {out}"
    )
    if plan.skipped_groups:
        _log(f"convert: left 16-bit by --skip: {', '.join(plan.skipped_groups)}")


def write_outputs(
    opts: ConvertOptions,
    model: InputModel,
    plan: ConversionPlan,
    fingerprint: dict,
    int4,
    out: Path,
    record,
    device: torch.device,
) -> ConversionReport:
    """Everything that writes: each output claimed in the owner record before it is created."""
    _log_start(model, plan, out, device)
    report = ConversionReport(str(out), 0.0, model.total_bytes, skipped_groups=plan.skipped_groups, device=str(device))
    if "fp16" in opts.formats:
        ownership.claim(out, record, "fp16", model.files)
        write_fp16(model, out / "fp16", progress=_log)

    max_bytes = shard_bytes(opts.max_shard_size)
    writers = {}
    for f in ("fp8", "int4"):
        if f in opts.formats:
            ownership.claim(out, record, f)
            writers[f] = ShardedWriter(out / f, max_bytes, fingerprint)
    for f, w in writers.items():
        report.resumed_shards[f] = w.resumed_shards
        if w.resumed_shards:
            _log(f"convert: {f}: resuming, {w.resumed_shards} finished shard(s) kept")
    if any(not w.complete for w in writers.values()):
        run_units(model, plan, opts, writers, int4, device, report.unit_seconds)
    for f, w in writers.items():
        if not w.complete:
            w.finish()
        copy_side_files(model, out / f)
    if "fp8" in writers:
        write_config(model, out / "fp8", fp8_quantization_config(plan, config_dtype(model.config)))
    if "int4" in writers:
        # The model's own dtype, as served in the GPU proof. Stock SGLang 0.5.17 runs a bf16 GPTQ MoE
        # only with `--quantization moe_wna16` (its GPTQ-Marlin MoE keeps fp16 scales) or `--dtype float16`.
        write_config(
            model,
            out / "int4",
            gptq_quantization_config(
                plan,
                config_dtype(model.config),
                desc_act=opts.desc_act,
                damp_percent=opts.damp_percent,
                method=opts.method,
            ),
        )
        report.int4_method = int4.report()
    if opts.mixed_config is not None:
        ownership.claim(out, record, CONFIG_NAME)
        files.write_text(out / CONFIG_NAME, opts.mixed_config)

    if opts.check or opts.verify:
        for f in writers:
            report.checks[f] = check_output(f, out / f, model, plan)
            _log(format_check(report.checks[f]))
    return report


def gate_verification(report: ConversionReport, opts: ConvertOptions) -> None:
    limits = {"fp8": opts.max_error_fp8, "int4": opts.max_error_int4}
    failures = []
    for f, c in report.checks.items():
        failures += c.problems
        failures += [f"{f}: {m} relative error {e:.4f} > {limits[f]}" for m, e in c.errors.items() if e > limits[f]]
    if failures:
        raise MixedPrecisionError(
            ErrorCode.VERIFY_FAILED,
            f"{len(failures)} check(s) failed:\n  " + "\n  ".join(failures[:30]),
            where=report.output_dir,
            fix="inspect the listed modules; raise --max_error_fp8/--max_error_int4 if expected, "
            "or leave them 16-bit with --skip",
        )
