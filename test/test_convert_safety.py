"""The converter against hostile runs: it never touches its input or what it did not write, refuses bad
arguments before writing, verifies what it resumes, and names a full disk or a denied write.

Every refusal is checked for its code and key words, and for leaving the input and the output exactly
as they were (a hash of every file, link and directory, before and after).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sglang_mixed_precision.cli import main as cli_main
from sglang_mixed_precision.convert import files as files_mod
from sglang_mixed_precision.convert import ownership
from sglang_mixed_precision.convert import writer as writer_mod
from sglang_mixed_precision.convert.pipeline import ConvertOptions, convert
from sglang_mixed_precision.core.errors import MixedPrecisionError, ValidationErrors

FAST = dict(method="rtn", check=False, max_shard_size="1MB")


def opts(model, out, **kw) -> ConvertOptions:
    return ConvertOptions(str(model), str(out), progress=False, **{**FAST, **kw})


def tree(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (links not followed): file contents hashed, link targets, directories."""
    root = Path(root)
    if not root.exists() and not root.is_symlink():
        return {}
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def tensors(d: Path) -> dict[str, torch.Tensor]:
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    got = {}
    for f in sorted(set(index.values())):
        with safe_open(str(d / f), "pt") as h:
            for k in h.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                got[k] = h.get_tensor(k)
    assert set(got) == set(index)
    return got


def assert_same_outputs(a: Path, b: Path, formats=("fp8", "int4")) -> None:
    for fmt in formats:
        ta, tb = tensors(a / fmt), tensors(b / fmt)
        assert set(ta) == set(tb), fmt
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{fmt}:{k}"
        assert (a / fmt / "config.json").read_text() == (b / fmt / "config.json").read_text()
        leftovers = [p.name for p in (b / fmt).iterdir() if p.name.endswith((".tmp", ".body"))]
        assert leftovers == [], leftovers


def refused(run, *, code: str, says: tuple[str, ...], untouched: tuple[Path, ...]) -> MixedPrecisionError:
    before = {p: tree(p) for p in untouched}
    with pytest.raises(MixedPrecisionError) as e:
        run()
    err = e.value
    assert err.code == code, str(err)
    for words in says:
        assert words in str(err), (words, str(err))
    for p in untouched:
        assert tree(p) == before[p], f"{p} changed"
        assert p.exists() or not before[p]
    return err


@pytest.fixture
def model(tiny_qwen3, tmp_path) -> Path:
    """A private copy of the tiny model (tests move it into and around output directories)."""
    return Path(shutil.copytree(tiny_qwen3, tmp_path / "model"))


@pytest.fixture(scope="module")
def clean(tiny_qwen3, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "o"
    convert(opts(tiny_qwen3, out))
    return out


# -- class 1: the input and what the converter did not write are never touched -------------------
def _layout(kind: str, model: Path, tmp: Path) -> tuple[Path, Path]:
    """(input, output) for one way of overlapping them."""
    if kind == "input_inside_output":  # the case: input out/fp16, output out
        (tmp / "out").mkdir()
        inp = Path(shutil.move(str(model), tmp / "out" / "fp16"))
        return inp, tmp / "out"
    if kind == "input_deep_inside_output":
        (tmp / "out" / "models").mkdir(parents=True)
        return Path(shutil.move(str(model), tmp / "out" / "models" / "m")), tmp / "out"
    if kind == "output_inside_input":
        return model, model / "converted"
    if kind == "output_is_input":
        return model, model
    if kind == "output_links_to_input":
        (tmp / "link").symlink_to(model)
        return model, tmp / "link"
    if kind == "output_entry_links_to_input":  # OUTPUT/fp16 -> the input: fp16/ would be written into it
        (tmp / "out").mkdir()
        (tmp / "out" / "fp16").symlink_to(model)
        return model, tmp / "out"
    if kind == "input_links_into_output":  # the input's shard is a link into the output
        (tmp / "out").mkdir()
        shutil.move(str(model / "model.safetensors"), tmp / "out" / "weights.safetensors")
        (model / "model.safetensors").symlink_to(tmp / "out" / "weights.safetensors")
        return model, tmp / "out"
    raise AssertionError(kind)


OVERLAPS = [
    "input_inside_output",
    "input_deep_inside_output",
    "output_inside_input",
    "output_is_input",
    "output_links_to_input",
    "output_entry_links_to_input",
    "input_links_into_output",
]


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("kind", OVERLAPS)
def test_output_overlapping_the_input_is_refused_before_anything_is_touched(model, tmp_path, kind, overwrite):
    inp, out = _layout(kind, model, tmp_path)
    err = refused(
        lambda: convert(opts(inp, out, overwrite=overwrite)),
        code="output_overlaps_input",
        says=("could replace or delete the input", "--output_dir"),
        untouched=(tmp_path,),
    )
    assert "--overwrite" not in err.fix  # the fix must not lead to the input's deletion
    suggested = Path(err.fix.rsplit("a new directory ", 1)[1])
    real_input = {Path(os.path.realpath(inp)), *(Path(os.path.realpath(p)) for p in Path(inp).iterdir())}
    for r in real_input:  # the suggested output is outside the input and holds none of it
        assert r != suggested and suggested not in r.parents and r not in suggested.parents


@pytest.mark.parametrize(
    "kind,says",
    [
        ("input_inside_output", "is inside the output directory"),
        ("output_inside_input", "the output directory is inside the input model directory"),
        ("output_is_input", "the output directory is the input model directory"),
        ("output_entry_links_to_input", "fp16 in the output leads into the input"),
        ("input_links_into_output", "the input's model.safetensors is"),
    ],
)
def test_overlap_message_says_how(model, tmp_path, kind, says):
    inp, out = _layout(kind, model, tmp_path)
    with pytest.raises(MixedPrecisionError) as e:
        convert(opts(inp, out))
    assert says in e.value.detail


def test_overlap_refused_on_the_command_line_without_a_traceback(model, tmp_path, capsys):
    inp, out = _layout("input_inside_output", model, tmp_path)
    before = tree(tmp_path)
    rc = cli_main(["convert", "--model_path", str(inp), "--output_dir", str(out), "--overwrite", "--no_progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "[output_overlaps_input]" in err and "Traceback" not in err
    assert tree(tmp_path) == before


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize(
    "planted",
    ["notes.txt", "fp16/", "fp8/config.json", "mixed_precision_config.yaml", "int4/mine/"],
    ids=["file", "dir_named_fp16", "file_named_like_an_output", "config_named_like_the_converters", "nested_dir"],
)
def test_what_the_converter_did_not_write_is_never_removed(model, tmp_path, planted, overwrite):
    out = tmp_path / "out"
    target = out / planted
    if planted.endswith("/"):
        target.mkdir(parents=True)
        (target / "precious.bin").write_bytes(b"user data")
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("user data")
    refused(
        lambda: convert(opts(model, out, overwrite=overwrite)),
        code="output_not_empty",
        says=("the converter did not write", planted.split("/")[0], "never removes"),
        untouched=(out, model),
    )


def test_a_foreign_file_inside_a_converted_output_blocks_overwrite(model, tmp_path):
    out = tmp_path / "out"
    convert(opts(model, out, formats=("fp16", "fp8")))
    (out / "fp8" / "my_notes.md").write_text("user data")
    refused(
        lambda: convert(opts(model, out, formats=("fp16", "fp8"), group_size=64, overwrite=True)),
        code="output_not_empty",
        says=("fp8/my_notes.md",),
        untouched=(out, model),
    )


@pytest.mark.parametrize("replace", ["fp8", "convert_report.json"])
def test_an_owned_entry_replaced_by_the_user_is_not_owned(model, tmp_path, replace):
    out = tmp_path / "out"
    convert(opts(model, out, formats=("fp16", "fp8")))
    p = out / replace
    shutil.rmtree(p) if p.is_dir() else p.unlink()
    if replace == "fp8":
        p.write_text("user data")  # a file where the converter made a directory
    else:
        p.mkdir()  # a directory where the converter wrote a file
        (p / "precious.bin").write_bytes(b"user data")
    refused(
        lambda: convert(opts(model, out, formats=("fp16", "fp8"), group_size=64, overwrite=True)),
        code="output_not_empty",
        says=(replace,),
        untouched=(out, model),
    )


def test_overwrite_removes_only_what_the_record_lists(model, tmp_path):
    out = tmp_path / "out"
    convert(opts(model, out, formats=("fp16", "fp8")))
    record = json.loads((out / ownership.OWNER_FILE).read_text())
    assert sorted(record["owned"]) == ["convert_report.json", "fp16", "fp8"]
    assert record["files"]["fp16"] == ["model.safetensors"]
    convert(opts(model, out, formats=("fp8", "int4"), group_size=64, overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == [ownership.OWNER_FILE, "convert_report.json", "fp8", "int4"]
    assert input_intact(model)


def input_intact(model: Path) -> bool:
    from safetensors.torch import load_file

    return len(load_file(str(model / "model.safetensors"))) > 0


def test_an_input_edited_between_runs_does_not_resume(model, tmp_path):
    """A fine-tune written over the input (same names, same sizes) is another conversion."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "out"
    convert(opts(model, out, formats=("fp8",)))
    state = load_file(str(model / "model.safetensors"))
    save_file({k: v + 1 if v.dim() == 2 else v for k, v in state.items()}, str(model / "model.safetensors"))
    refused(
        lambda: convert(opts(model, out, formats=("fp8",))),
        code="output_not_empty",
        says=("holds another conversion", "input_files", "--overwrite"),
        untouched=(out,),
    )
    convert(opts(model, out, formats=("fp8",), overwrite=True))
    written, edited = tensors(out / "fp8"), load_file(str(model / "model.safetensors"))
    assert torch.equal(written["model.embed_tokens.weight"], edited["model.embed_tokens.weight"])


def test_an_owner_record_naming_paths_outside_the_output_reaches_nothing(model, tmp_path):
    out, outside = tmp_path / "out", tmp_path / "precious"
    outside.mkdir()
    (outside / "data.bin").write_bytes(b"user data")
    convert(opts(model, out, formats=("fp8",)))
    record = json.loads((out / ownership.OWNER_FILE).read_text())
    record["owned"] += ["../precious", str(outside), str(model)]
    (out / ownership.OWNER_FILE).write_text(json.dumps(record))
    before = tree(outside), tree(model)
    convert(opts(model, out, formats=("fp8",), group_size=64, overwrite=True))
    assert (tree(outside), tree(model)) == before


def test_an_unreadable_owner_record_owns_nothing(model, tmp_path):
    out = tmp_path / "out"
    convert(opts(model, out, formats=("fp16",)))
    (out / ownership.OWNER_FILE).write_text("{ torn")
    refused(
        lambda: convert(opts(model, out, formats=("fp16",), overwrite=True)),
        code="output_not_empty",
        says=("fp16",),
        untouched=(out,),
    )


# -- class 4: arguments checked before anything is written ------------------------------------------
BAD_ARGUMENTS = [
    ({"max_shard_size": "0"}, "bad_argument", "--max_shard_size '0'"),
    ({"max_shard_size": "-1GB"}, "bad_argument", "must be a positive size"),
    ({"max_shard_size": "lots"}, "bad_argument", "--max_shard_size 'lots'"),
    ({"max_shard_size": "inf"}, "bad_argument", "--max_shard_size 'inf'"),
    ({"max_shard_size": "nanGB"}, "bad_argument", "--max_shard_size 'nanGB'"),
    ({"nsamples": 0}, "bad_argument", "--nsamples 0: must be an integer >= 1"),
    ({"nsamples": -3}, "bad_argument", "--nsamples -3"),
    ({"seqlen": 0}, "bad_argument", "--seqlen 0: must be an integer >= 8"),
    ({"seqlen": 2}, "bad_argument", "--seqlen 2"),
    ({"damp_percent": 0.0}, "bad_argument", "--damp_percent 0.0: must be a number strictly between 0 and 1"),
    ({"damp_percent": 5}, "bad_argument", "--damp_percent 5"),
    ({"damp_percent": -0.01}, "bad_argument", "--damp_percent -0.01"),
    ({"damp_percent": float("nan")}, "bad_argument", "--damp_percent nan"),
    ({"min_expert_tokens": -1}, "bad_argument", "--min_expert_tokens -1"),
    ({"max_error_fp8": 0.0}, "bad_argument", "--max_error_fp8 0.0: must be a finite number > 0"),
    ({"max_error_int4": float("inf")}, "bad_argument", "--max_error_int4 inf"),
    ({"group_size": 96}, "bad_group_size", "group_size 96"),
    ({"group_size": 0}, "bad_group_size", "group_size 0"),
    ({"formats": ()}, "bad_format", "no output format given"),
    ({"formats": ("fp8", "fp4")}, "bad_format", "'fp4'"),
    ({"method": "awq"}, "bad_method", "'awq'"),
    ({"skip": ["model.layers.*.self_atn.*"]}, "bad_argument", "matches no linear module"),
    ({"skip": [""]}, "bad_argument", "each pattern must be a non-empty glob"),
    ({"calib_file": "/no/such/calib.txt"}, "calib_file_missing", "calibration file not found"),
    ({"calib_file": "DIR"}, "calib_file_missing", "is not a regular file"),
    ({"calib_file": "EMPTY"}, "calib_too_short", "calibration file is empty"),
    ({"calib_file": "SHORT", "method": "gptq"}, "calib_too_short", "calibration text has only"),
]


def _resolve_calib(change: dict, tmp: Path) -> dict:
    special = {"DIR": tmp, "EMPTY": tmp / "empty.txt", "SHORT": tmp / "short.txt"}
    (tmp / "empty.txt").write_text("  \n")
    (tmp / "short.txt").write_text("only a few words")
    return {k: str(special.get(v, v)) if k == "calib_file" else v for k, v in change.items()}


@pytest.mark.parametrize("existing", [False, True], ids=["new_output", "earlier_output"])
@pytest.mark.parametrize("change,code,says", BAD_ARGUMENTS, ids=[f"{c}-{s[:24]}" for _, c, s in BAD_ARGUMENTS])
def test_bad_arguments_are_refused_before_writing(tiny_qwen3, tmp_path, clean, change, code, says, existing):
    out = tmp_path / "out"
    if existing:  # an earlier, finished conversion there: the refused run must leave it as it was
        shutil.copytree(clean, out)
    change = _resolve_calib(change, tmp_path)
    refused(lambda: convert(opts(tiny_qwen3, out, **change)), code=code, says=(says,), untouched=(out, tiny_qwen3))
    assert out.exists() == existing


def test_every_bad_argument_is_reported_at_once(tiny_qwen3, tmp_path):
    with pytest.raises(ValidationErrors) as e:
        convert(opts(tiny_qwen3, tmp_path / "out", nsamples=0, seqlen=-1, damp_percent=2.0, max_shard_size="x"))
    assert e.value.codes == ["bad_argument"] * 4
    assert not (tmp_path / "out").exists()


def test_a_refused_run_does_not_block_the_corrected_rerun(tiny_qwen3, tmp_path, clean):
    out = tmp_path / "out"
    with pytest.raises(MixedPrecisionError):
        convert(opts(tiny_qwen3, out, max_shard_size="0"))
    convert(opts(tiny_qwen3, out))
    assert_same_outputs(clean, out)


@pytest.mark.parametrize(
    "argv,says",
    [
        (["--max_shard_size", "two gigs"], "--max_shard_size 'two gigs'"),
        (["--damp_percent", "0"], "--damp_percent 0.0"),
        (["--formats", "fp8,bf8"], "unknown output format(s) ['bf8']"),
    ],
)
def test_bad_arguments_on_the_command_line(tiny_qwen3, tmp_path, capsys, argv, says):
    rc = cli_main(["convert", "--model_path", str(tiny_qwen3), "--output_dir", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and says in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


# -- class 4: resume verifies finished shards --------------------------------------------------------
def _damage(out: Path, how: str) -> None:
    shard = sorted((out / "int4").glob("model-*.safetensors"))[0]
    if how == "deleted":
        shard.unlink()
    elif how == "truncated":
        os.truncate(shard, shard.stat().st_size - 100)
    elif how == "garbled_header":
        with open(shard, "r+b") as f:
            f.seek(8)
            f.write(b"\x00garbage")
    elif how == "other_tensors":  # a shard replaced by another of the same output
        other = sorted((out / "int4").glob("model-*.safetensors"))[1]
        shutil.copy(other, shard)
    elif how == "index_deleted":
        (out / "int4" / "model.safetensors.index.json").unlink()
    elif how == "state_torn":
        (out / "int4" / writer_mod.STATE_FILE).write_text('{"fingerprint": ')
    else:
        raise AssertionError(how)


@pytest.mark.parametrize(
    "how", ["deleted", "truncated", "garbled_header", "other_tensors", "index_deleted", "state_torn"]
)
def test_resume_redoes_missing_or_damaged_shards(tiny_qwen3, tmp_path, clean, how):
    out = tmp_path / "out"
    convert(opts(tiny_qwen3, out))
    _damage(out, how)
    convert(opts(tiny_qwen3, out))  # the same command again, no --overwrite
    assert_same_outputs(clean, out)


def test_resume_of_gptq_redoes_a_deleted_shard_in_the_middle(tiny_qwen3, tmp_path):
    """Calibration flows through the kept layers (replayed from their written weights) into the redone one."""
    kw = dict(method="gptq", nsamples=2, seqlen=64, formats=("int4",))
    clean, out = tmp_path / "clean", tmp_path / "out"
    convert(opts(tiny_qwen3, clean, **kw))
    convert(opts(tiny_qwen3, out, **kw))
    shards = sorted((out / "int4").glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[len(shards) // 2].unlink()
    report = convert(opts(tiny_qwen3, out, **kw))
    assert report.resumed_shards["int4"] == len(shards) - 1
    assert_same_outputs(clean, out, formats=("int4",))


@pytest.mark.parametrize("state", ['{"fingerprint": {}, "shards": 3}', '{"shards": [{"file": 1}]}', "[]"])
def test_a_malformed_state_file_redoes_the_output(tiny_qwen3, tmp_path, clean, state):
    out = tmp_path / "out"
    convert(opts(tiny_qwen3, out))
    fingerprint = json.loads((out / "fp8" / writer_mod.STATE_FILE).read_text())["fingerprint"]
    doc = json.loads(state)
    if isinstance(doc, dict):
        doc["fingerprint"] = fingerprint  # the same conversion, so the broken entries are read
    (out / "fp8" / writer_mod.STATE_FILE).write_text(json.dumps(doc))
    convert(opts(tiny_qwen3, out))
    assert_same_outputs(clean, out)


def test_kill_before_the_first_shard_closed_resumes(tiny_qwen3, tmp_path, clean, monkeypatch):
    """As after SIGKILL: fp16/ and the owner record written, shard bodies and temporary files left behind."""

    def killed(self, name, t):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(writer_mod.ShardedWriter, "add", killed)
    monkeypatch.setattr(writer_mod.ShardedWriter, "abort", lambda self: None)  # a kill cleans nothing up
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert(opts(tiny_qwen3, out))
    monkeypatch.undo()
    assert (out / ownership.OWNER_FILE).is_file() and not list((out / "fp8").glob("model-*"))
    (out / "fp8" / "part-00001.safetensors.body").write_bytes(b"\x01" * 1000)
    (out / "fp8" / "part-00001.safetensors.tmp").write_bytes(b"\x02" * 10)
    (out / "fp8" / "config.json.tmp").write_text("{")
    (out / "int4").mkdir(exist_ok=True)
    (out / "int4" / "part-00001.safetensors.body").write_bytes(b"\x03" * 10)
    convert(opts(tiny_qwen3, out))
    assert_same_outputs(clean, out)


# -- class 4: a full disk, a denied write ----------------------------------------------------------
def _fail_on_call(monkeypatch, cls, method: str, n: int, error: OSError) -> list[int]:
    real = getattr(cls, method)
    calls = [0]

    def failing(self, *a, **kw):
        calls[0] += 1
        if calls[0] == n:
            raise error
        return real(self, *a, **kw)

    monkeypatch.setattr(cls, method, failing)
    return calls


@pytest.mark.parametrize(
    "where,code",
    [
        ("tensor", errno.ENOSPC),  # writing a tensor into a shard body
        ("shard_close", errno.EDQUOT),  # assembling a shard: the user's quota
        ("config", errno.ENOSPC),  # a small file written after the shards
    ],
)
def test_full_disk_is_named_and_the_rerun_resumes(tiny_qwen3, tmp_path, clean, monkeypatch, where, code):
    out = tmp_path / "out"
    error = OSError(code, os.strerror(code))
    if where == "tensor":
        _fail_on_call(monkeypatch, writer_mod._OpenShard, "add", 40, error)
    elif where == "shard_close":
        _fail_on_call(monkeypatch, writer_mod._OpenShard, "close", 2, error)
    else:
        real = files_mod.write_bytes

        def full(path, data):
            if path.name == "config.json" and path.parent.name == "int4":
                raise OSError(code, os.strerror(code), str(path))
            return real(path, data)

        monkeypatch.setattr(files_mod, "write_bytes", full)
    with pytest.raises(MixedPrecisionError) as e:
        convert(opts(tiny_qwen3, out))
    err = e.value
    assert err.code == "disk_full"
    assert "no space left" in err.detail and "free" in err.detail and "need about" in err.detail
    assert "rerun the same command" in err.fix and "resumes" in err.fix
    monkeypatch.undo()
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("*.body"))  # the space is given back
    convert(opts(tiny_qwen3, out))
    assert_same_outputs(clean, out)


def test_too_little_space_is_refused_before_writing(tiny_qwen3, tmp_path, monkeypatch):
    monkeypatch.setattr(files_mod, "free_bytes", lambda path: 1000)
    refused(
        lambda: convert(opts(tiny_qwen3, tmp_path / "out")),
        code="disk_full",
        says=("before writing", "1000 B is free"),
        untouched=(tmp_path,),
    )
    assert not (tmp_path / "out").exists()


def test_unwritable_output_is_refused_before_writing(tiny_qwen3, tmp_path, monkeypatch):
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real(p, mode))
    refused(
        lambda: convert(opts(tiny_qwen3, tmp_path / "out")),
        code="output_unwritable",
        says=("not writable", "write permission"),
        untouched=(tmp_path,),
    )


def test_denied_write_during_the_run_is_named(tiny_qwen3, tmp_path, clean, monkeypatch):
    real = files_mod.write_bytes

    def denied(path, data):
        if path.name == "config.json":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, data)

    monkeypatch.setattr(files_mod, "write_bytes", denied)
    out = tmp_path / "out"
    with pytest.raises(MixedPrecisionError) as e:
        convert(opts(tiny_qwen3, out))
    assert e.value.code == "output_unwritable" and "Permission denied" in str(e.value)
    assert e.value.where.endswith("config.json") and "write permission" in e.value.fix
    monkeypatch.undo()
    convert(opts(tiny_qwen3, out))
    assert_same_outputs(clean, out)


def test_output_parent_is_a_file(tiny_qwen3, tmp_path):
    (tmp_path / "f").write_text("x")
    refused(
        lambda: convert(opts(tiny_qwen3, tmp_path / "f" / "out")),
        code="output_not_dir",
        says=("is not a directory",),
        untouched=(tmp_path,),
    )
