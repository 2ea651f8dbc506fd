"""The project's one error type and its one list of error codes.

Every problem a user can fix is a :class:`MixedPrecisionError` with a code from :class:`ErrorCode`
(stable: tests and tools match on it; the HTTP routes answer with its status), a message, ``where``
(the file, tensor, module or rule at fault) and ``fix`` (what to do). ``docs/ERRORS.md`` is
generated from :class:`ErrorCode` (``sglang-mp errors --markdown``); a test keeps the two equal.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from enum import Enum

EXAMPLES = 5  # items a message lists before "and N more"


class ErrorCode(str, Enum):
    """(code, HTTP status when a route answers with it, one-line meaning)."""

    def __new__(cls, code: str, status: int, meaning: str):
        member = str.__new__(cls, code)
        member._value_ = code
        member.status = status
        member.meaning = meaning
        return member

    # str, not "ErrorCode.X", wherever a code is printed or formatted (the same on every Python)
    __str__ = str.__str__
    __format__ = str.__format__

    # ---- the mixed-precision YAML
    CONFIG_SYNTAX = ("config_syntax", 400, "the YAML cannot be read, or a value has the wrong type")
    CONFIG_UNKNOWN_KEY = ("config_unknown_key", 400, "a key the config format does not know (a typo?)")
    CONFIG_DUPLICATE_KEY = ("config_duplicate_key", 400, "the same key twice in one mapping")
    CONFIG_BAD_LABEL = ("config_bad_label", 400, "a source label that is malformed or names no source")
    CONFIG_BAD_PATTERN = ("config_bad_pattern", 400, "a rule's glob or regular expression cannot be compiled")
    CONFIG_DUPLICATE_LABEL = ("config_duplicate_label", 400, "two sources under one label")
    CONFIG_CONFLICT = ("config_conflict", 400, "one module mapped to two sources")
    CONFIG_NO_SOURCES = ("config_no_sources", 400, "the config names no checkpoint")
    SOURCE_LABEL_MISMATCH = (
        "source_label_mismatch",
        400,
        "a seed key's checkpoint is not in its format (fp8_path holding a GPTQ or 16-bit model, ...)",
    )
    # ---- checkpoints (directories, config.json, headers)
    MISSING_SOURCE = ("missing_source", 400, "a source directory is absent, or no 16-bit source gives the model")
    MISSING_FILE = ("missing_file", 400, "a file the plan or command needs does not exist")
    UNREADABLE_FILE = (
        "unreadable_file",
        400,
        "a file or directory exists but cannot be read (permissions, a directory or device in its place)",
    )
    CORRUPT_CONFIG = (
        "corrupt_config",
        400,
        "config.json (or another JSON side file) is invalid, or lacks or misstates a model dimension",
    )
    CORRUPT_INDEX = ("corrupt_index", 400, "the index file's weight_map is malformed")
    CORRUPT_SAFETENSORS = ("corrupt_safetensors", 400, "a safetensors file is truncated or its header malformed")
    CORRUPT_CHECKPOINT = ("corrupt_checkpoint", 400, "a PyTorch .bin file cannot be read without executing code")
    UNSUPPORTED_SCHEME = ("unsupported_scheme", 400, "a quantization format or setting SGLang cannot run in a mix")
    UNSUPPORTED_ARCHITECTURE = ("unsupported_architecture", 400, "a model family the command does not handle")
    # ---- the plan
    ARCHITECTURE_MISMATCH = (
        "architecture_mismatch",
        400,
        "sources are checkpoints of different models, or a checkpoint holds layers its config.json lacks",
    )
    SKELETON_QUANTIZED = ("skeleton_quantized", 400, "the source that gives the model is quantized")
    UNKNOWN_MODULE = ("unknown_module", 400, "a weight_mapping name matches no module of the model")
    MISSING_TENSOR = ("missing_tensor", 400, "a tensor the model needs is not in the source that provides it")
    SHAPE_MISMATCH = ("shape_mismatch", 400, "a stored tensor's dtype or shape disagrees with config.json")
    MIXED_GROUP = ("mixed_group", 400, "members of one fused SGLang layer have different precisions")
    TP_INDIVISIBLE = ("tp_indivisible", 400, "a per-rank shape the kernel cannot run at this tensor-parallel size")
    QUANTIZED_VOCAB = ("quantized_vocab", 400, "a quantized embedding or lm_head (SGLang serves them in 16 bits)")
    ARCHITECTURE_REFUSES_SCHEME = (
        "architecture_refuses_scheme",
        400,
        "the family's SGLang model cannot load or run this layer in this precision (MLA attention in int4, ...)",
    )
    MODEL_CLASS_CANNOT_LOAD = (
        "model_class_cannot_load",
        400,
        "the family's SGLang model class cannot load what the plan assigns (e.g. a tied lm_head it does not tie)",
    )
    BAD_ARGUMENT = ("bad_argument", 400, "a command-line or API argument out of range")
    OUTPUT_UNWRITABLE = (
        "output_unwritable",
        400,
        "an output path cannot be written (no such directory, no permission, or it would replace another file)",
    )
    MISSING_DEPENDENCY = ("missing_dependency", 400, "an optional Python package the command needs is absent")
    VALIDATION_FAILED = ("validation_failed", 400, "several problems found in one pass (listed under errors)")
    # ---- the converter
    NOT_A_MODEL_DIR = ("not_a_model_dir", 400, "the converter's input is not a model directory")
    ALREADY_QUANTIZED = ("already_quantized", 400, "the converter's input is quantized already")
    BAD_PRECISION = ("bad_precision", 400, "a precision name the converter does not make")
    BAD_FORMAT = ("bad_format", 400, "an output format the converter does not write")
    BAD_METHOD = ("bad_method", 400, "an int4 method the converter does not know")
    BAD_GROUP_SIZE = ("bad_group_size", 400, "a GPTQ group size the kernels cannot run")
    BAD_DEVICE = ("bad_device", 400, "--device names a device this machine does not have (cuda without a GPU)")
    SHAPE_NOT_DIVISIBLE = ("shape_not_divisible", 400, "a linear whose shape the chosen format cannot split")
    UNSUPPORTED_TENSOR = ("unsupported_tensor", 400, "a tensor the converter cannot place (unknown name or dtype)")
    CALIB_FILE_MISSING = ("calib_file_missing", 400, "the calibration text file is absent or unreadable")
    CALIB_TOO_SHORT = ("calib_too_short", 400, "the calibration text is shorter than nsamples x seqlen tokens")
    NO_TOKENIZER = ("no_tokenizer", 400, "GPTQ calibration needs the model's tokenizer files")
    OUTPUT_NOT_DIR = ("output_not_dir", 400, "the output path exists and is not a directory")
    OUTPUT_NOT_EMPTY = (
        "output_not_empty",
        400,
        "the output directory holds files the converter did not write, or another conversion",
    )
    OUTPUT_OVERLAPS_INPUT = (
        "output_overlaps_input",
        400,
        "the converter's output is, holds, lies inside or links into its input",
    )
    DISK_FULL = ("disk_full", 507, "no space left (or over quota) on the output's filesystem")
    VERIFY_FAILED = ("verify_failed", 400, "a converted tensor dequantizes too far from its original")
    # ---- launcher and plan directory
    LAUNCH_NO_CONFIG = ("launch_no_config", 400, "--enable-mixed-precision without a config")
    LAUNCH_MODEL_NOT_A_SOURCE = ("launch_model_not_a_source", 400, "--model-path is not one of the config's sources")
    LAUNCH_PP_UNSUPPORTED = ("launch_pp_unsupported", 400, "pipeline parallelism is not supported for mixes")
    LAUNCH_FLAG_WITHOUT_ENABLE = (
        "launch_flag_without_enable",
        400,
        "a mixed-precision flag without --enable-mixed-precision",
    )
    PLUGIN_NOT_INSTALLED = ("plugin_not_installed", 400, "SGLang cannot see the plugin's entry point")
    PLUGIN_DISABLED = ("plugin_disabled", 400, "SGLANG_PLUGINS excludes the mixed_precision plugin")
    SGLANG_INCOMPATIBLE = (
        "sglang_incompatible",
        500,
        "the installed SGLang lacks a function, method or argument the plugin hooks or calls",
    )
    PLAN_DIR_INVALID = ("plan_dir_invalid", 400, "a plan directory's quantization_config is malformed")
    PLAN_DIR_TARGET = ("plan_dir_target", 400, "the plan directory cannot be written there")
    PLAN_DIR_NO_TOKENIZER = ("plan_dir_no_tokenizer", 400, "the model has no tokenizer to put in the plan directory")
    # ---- inside SGLang (model construction and load)
    LAYER_NOT_PLANNED = ("layer_not_planned", 500, "SGLang builds a layer the plan assigns no source")
    METHOD_MISMATCH = ("method_mismatch", 500, "a source's quantization_config picks another method than its tensors")
    UNSUPPORTED_LAYER_SCHEME = (
        "unsupported_layer_scheme",
        500,
        "SGLang has no method for this layer in this precision",
    )
    LOAD_FORMAT_UNSUPPORTED = ("load_format_unsupported", 400, "a --load-format the mixed loader cannot serve")
    LOADER_WITHOUT_PLAN = ("loader_without_plan", 500, "the mixed loader got a model built without the mixed config")
    LOADER_STREAM = ("loader_stream", 500, "the mixed loader was handed another weight stream")
    SHARED_EXPERTS_FUSED = (
        "shared_experts_fused",
        500,
        "SGLang fused the shared experts into the routed experts' layer, which a mix gives a source of its own",
    )
    LOAD_AUDIT_FAILED = ("load_audit_failed", 500, "after loading, the model is not exactly the plan")
    # ---- runtime: info and reload
    NOT_MIXED_PRECISION = ("not_mixed_precision", 404, "the server does not serve a mixed-precision plan")
    NOT_READY = ("not_ready", 503, "the server is still starting")
    RELOAD_BAD_REQUEST = ("reload_bad_request", 400, "a malformed reload request body")
    RELOAD_MODEL_MISMATCH = ("reload_model_mismatch", 400, "the reload's config describes another model")
    RELOAD_NEEDS_REBUILD = (
        "reload_needs_rebuild",
        409,
        "a layer whose new source needs a rebuild (restart), not a copy",
    )
    RELOAD_BUSY = ("reload_busy", 409, "another reload is in progress")
    RELOAD_BAD_TENSOR = ("reload_bad_tensor", 400, "a new tensor is unreadable, of another shape or not finite")
    RELOAD_LAYER_MISSING = ("reload_layer_missing", 400, "the served model has no layer the reload names")
    RELOAD_SOURCES_CHANGED = ("reload_sources_changed", 400, "checkpoint files changed between validation and reload")
    RELOAD_APPLY_FAILED = ("reload_apply_failed", 500, "copying the new weights failed; the old ones were restored")
    RELOAD_WORKER_MISSING = ("reload_worker_missing", 500, "a worker did not answer the reload")
    RESTART_UNAVAILABLE = ("restart_unavailable", 409, "no launcher supervises this server, so it cannot restart")
    RESTART_BAD_REQUEST = ("restart_bad_request", 400, "a restart marker file is malformed")
    INTERNAL_ERROR = ("internal_error", 500, "an unexpected exception (a bug: please report it with the log)")
    # ---- reference path and quality tools
    REFERENCE_UNFILLED = ("reference_unfilled", 500, "the reference model has parameters no planned tensor filled")
    REFERENCE_NO_PARAMETER = ("reference_no_parameter", 500, "a planned tensor has no parameter in the reference model")
    REFERENCE_SHAPE = ("reference_shape", 500, "a planned tensor's shape differs from the reference parameter's")
    REFERENCE_ACT_GROUP = ("reference_act_group", 500, "fp8 activation groups do not divide a layer's input")
    AUTOPLAN_BUDGET_TOO_SMALL = (
        "autoplan_budget_too_small",
        400,
        "no mix of the sources fits the memory budget per rank (the message gives the smallest that does)",
    )
    SENSITIVITY_MISSING = (
        "sensitivity_missing",
        400,
        "autoplan needs a unit's measured KLD increase that no sensitivity run of these sources and text holds",
    )
    QUALITY_TEXT_TOO_SHORT = ("quality_text_too_short", 400, "the evaluation text has too few tokens to score")
    QUALITY_BAD_RESPONSE = (
        "quality_bad_response",
        502,
        "a server's log-prob answer lacks the fields or the positions the evaluation asked for",
    )


class MixedPrecisionError(ValueError):
    """A problem with the user's config, checkpoints or arguments (``code`` an :class:`ErrorCode`)."""

    def __init__(self, code: ErrorCode | str, message: str, *, where: str | None = None, fix: str | None = None):
        self.code = ErrorCode(code)  # an unknown code fails here, loudly, where it is raised
        self.detail = message
        self.where = where
        self.fix = fix
        super().__init__(self._render())

    @property
    def status(self) -> int:
        return self.code.status

    def _render(self) -> str:
        parts = [f"[{self.code}] {self.detail}"]
        if self.where:
            parts.append(f"  at: {self.where}")
        if self.fix:
            parts.append(f"  fix: {self.fix}")
        return "\n".join(parts)

    def to_json(self) -> dict:
        return {"code": str(self.code), "message": self.detail, "where": self.where, "fix": self.fix}


class ValidationErrors(MixedPrecisionError):
    """Several independent problems found in one validation pass (plan, config, converter run), reported together."""

    def __init__(self, errors: Iterable[MixedPrecisionError]):
        self.errors = list(errors)
        lines = [f"{len(self.errors)} problem(s) found:"]
        lines += [str(e) for e in self.errors]
        super().__init__(ErrorCode.VALIDATION_FAILED, "\n".join(lines))

    def _render(self) -> str:
        return self.detail

    @property
    def codes(self) -> list[str]:
        return [str(e.code) for e in self.errors]

    def to_json(self) -> dict:
        return {"code": str(self.code), "message": self.detail, "errors": [e.to_json() for e in self.errors]}


def raise_all(errors: Sequence[MixedPrecisionError]) -> None:
    """Raise ``errors``: the error itself when there is one, :class:`ValidationErrors` when several."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ValidationErrors(errors)


def more(items: Sequence[str], total: int | None = None, *, limit: int = EXAMPLES, sep: str = ", ") -> str:
    """``a, b, c and 7 more``: the first ``limit`` of ``items`` and how many of ``total`` were left out."""
    total = len(items) if total is None else total
    shown = list(items[:limit])
    rest = total - len(shown)
    return sep.join(shown) + (f" and {rest} more" if rest > 0 else "")


def error_json(error: BaseException) -> dict:
    """What the HTTP routes answer for an error (an unexpected exception is an ``internal_error``)."""
    if isinstance(error, MixedPrecisionError):
        return error.to_json()
    return {"code": str(ErrorCode.INTERNAL_ERROR), "message": f"{type(error).__name__}: {error}"}


def http_status(error: BaseException) -> int:
    return error.status if isinstance(error, MixedPrecisionError) else ErrorCode.INTERNAL_ERROR.status


def markdown_table() -> str:
    """docs/ERRORS.md: every code with its HTTP status and meaning."""
    lines = [
        "# Error codes",
        "",
        "Generated from `sglang_mixed_precision.core.errors.ErrorCode` (`sglang-mp errors --markdown`).",
        "Every error names where the problem is (`at:`) and what to do (`fix:`); the HTTP routes answer with",
        "the status below. The user guide's troubleshooting section gives examples and fixes.",
        "",
        "| code | HTTP | meaning |",
        "|---|---|---|",
    ]
    lines += [f"| `{c.value}` | {c.status} | {c.meaning} |" for c in ErrorCode]
    return "\n".join(lines) + "\n"
