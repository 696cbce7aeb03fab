"""Offline batch generation.

    python -m fineserve_jax.generate --model=tiny-llama --quant=org --input=in.jsonl --output=out.jsonl
    python -m fineserve_jax.generate --input=in.jsonl --output=out.jsonl --max_tokens=64 --resume

Input: JSON Lines. The file is read as bytes and split on b"\\n" only (U+2028 and other
Unicode line separators are ordinary characters inside JSON strings); blank lines are skipped.
Each other line is decoded (UTF-8) and parsed on its own: a JSON object with `prompt` (text or
token ids) and optional sampling fields (`max_tokens`, `temperature`, `top_p`, `top_k`,
`seed`, `stop_token_ids`, `ignore_eos`). A field a line leaves out takes the value of the flag
of the same name, if given, else `SamplingParams`'s default.

Output: one line per non-blank input line, in input order, standard JSON (ASCII, no
NaN/Infinity). Every record has `line` (its line number in the input file). A good line gets
the input object plus `text`, `token_ids` and `finish_reason`; a bad line (not UTF-8, not JSON,
nested too deeply, NaN/Infinity, a wrong field) gets `error` ("line N: ...") and `input` (the
line's text); a request the engine fails gets the input object plus `error`.

Robustness: all flags are checked first (a usage error names the flag); the output file is
created before the model is loaded, so an unwritable path fails at once; `--output` may not
be the input file (compared by device and inode, so links count too). Lines run in chunks of
`--chunk_size`; each chunk's records are written, flushed and fsynced as soon as it is done, so
a process that dies loses at most the chunk in flight. `--resume` keeps the complete records an
earlier, interrupted run left in `--output` (checking they belong to this input) and goes on
from the next line.

The exit status is 0 once every line has a record (count the `error` fields for per-line
failures), 1 for a usage error.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from absl import app, flags

SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "top_k", "seed")
ATTENTION_IMPLS = ("auto", "reference", "xla", "cpu", "pallas_triton")
DTYPES = ("float32", "bfloat16")
MAX_MODEL_LEN_LIMIT = 1 << 20  # block tables are sized from it: a typo must not allocate GiBs
_BOM = b"\xef\xbb\xbf"


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """Define the CLI's flags on `fv`. Not done at import: this module is also a library
    (`fineserve_jax.generate.run`), and flag names like `model` or `max_model_len` would
    collide with those of any script that imports it."""
    flags.DEFINE_string("model", "tiny-llama", "model preset name or HF checkpoint dir", flag_values=fv)
    flags.DEFINE_string("quant", "org", "precision preset", flag_values=fv)
    flags.DEFINE_string("input", None, "input JSONL", flag_values=fv)
    flags.DEFINE_string("output", None, "output JSONL (not the input file)", flag_values=fv)
    flags.DEFINE_string("attention_impl", "auto", " | ".join(ATTENTION_IMPLS), flag_values=fv)
    flags.DEFINE_integer("max_model_len", 512, "longest prompt + output", flag_values=fv)
    flags.DEFINE_string("dtype", "float32", " | ".join(DTYPES), flag_values=fv)
    flags.DEFINE_integer("arena_mib", None, "KV cache arena size (MiB); default: sized so the "
                         "largest decode batch fits at --max_model_len", flag_values=fv)
    flags.DEFINE_integer("chunk_size", 256, "lines generated (and written) per chunk", flag_values=fv)
    flags.DEFINE_boolean("resume", False, "keep the complete records already in --output and "
                         "continue after them", flag_values=fv)
    flags.DEFINE_boolean("progress", True, "show a progress bar", flag_values=fv)
    flags.DEFINE_integer("max_tokens", None, "default max_tokens for lines without one", flag_values=fv)
    flags.DEFINE_float("temperature", None, "default temperature", flag_values=fv)
    flags.DEFINE_float("top_p", None, "default top_p", flag_values=fv)
    flags.DEFINE_integer("top_k", None, "default top_k", flag_values=fv)
    flags.DEFINE_integer("seed", None, "default seed (every line that omits it gets this one)",
                         flag_values=fv)


# -- options --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Options:
    """Checked CLI settings (`check_options` builds them)."""

    model: str
    quant: str
    input: str
    output: str
    attention_impl: str = "auto"
    max_model_len: int = 512
    dtype: str = "float32"
    arena_bytes: object = "auto"  # int bytes or "auto"
    chunk_size: int = 256
    resume: bool = False
    progress: bool = True
    defaults: Tuple[Tuple[str, object], ...] = ()  # sampling fields for lines that omit them


def _usage(flag: str, msg: str) -> app.UsageError:
    return app.UsageError(f"--{flag}: {msg}")


def _int_in(flag: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _usage(flag, f"must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def check_options(*, model, quant, input, output, attention_impl="auto", max_model_len=512,
                  dtype="float32", arena_mib=None, chunk_size=256, resume=False, progress=True,
                  **sampling_defaults) -> Options:
    """Check every setting (no file is touched); raises `app.UsageError` naming the flag."""
    from fineserve_jax.core.field_checks import InvalidRequest
    from fineserve_jax.core.sampling_params import SamplingParams
    from fineserve_jax.formats import PRESETS

    unknown = set(sampling_defaults) - set(SAMPLING_FLAGS)
    if unknown:
        raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
    for flag, value in (("input", input), ("output", output), ("model", model)):
        if not isinstance(value, str) or not value:
            raise _usage(flag, "is required")
    if quant not in PRESETS:
        raise _usage("quant", f"unknown precision preset {quant!r}; valid: {', '.join(PRESETS)}")
    if attention_impl not in ATTENTION_IMPLS:
        raise _usage("attention_impl", f"must be one of {', '.join(ATTENTION_IMPLS)}, got {attention_impl!r}")
    if dtype not in DTYPES:
        raise _usage("dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}")
    # 2: the shortest request is one prompt token plus one generated token.
    _int_in("max_model_len", max_model_len, 2, MAX_MODEL_LEN_LIMIT)
    if arena_mib is not None:
        _int_in("arena_mib", arena_mib, 1, 1 << 20)
    _int_in("chunk_size", chunk_size, 1, 1 << 20)
    defaults = {k: v for k, v in sampling_defaults.items() if v is not None}
    try:
        SamplingParams(**defaults)
    except InvalidRequest as e:
        raise _usage(e.field or "?", str(e)) from None
    return Options(model, quant, input, output, attention_impl, max_model_len, dtype,
                   "auto" if arena_mib is None else arena_mib << 20, chunk_size, bool(resume), bool(progress),
                   tuple(sorted(defaults.items())))


# -- input lines ----------------------------------------------------------------------------

@dataclasses.dataclass
class Line:
    """One non-blank input line: its 1-based line number, raw bytes and parse result."""

    number: int
    raw: bytes
    obj: Optional[dict] = None  # the parsed object (valid lines)
    prompt: object = None  # the checked prompt: str or list of ints
    sampling: object = None  # its SamplingParams
    error: Optional[str] = None

    @property
    def text(self) -> str:
        """The line as text for echoing in an error record (undecodable bytes as \\xNN)."""
        return self.raw.decode("utf-8", "backslashreplace").rstrip("\r")


def split_lines(data: bytes) -> List[Tuple[int, bytes]]:
    """(line number, bytes) of every non-blank line, splitting on b"\\n" only. A UTF-8 BOM at
    the start of the file is dropped; blank means only JSON whitespace (space, tab, CR)."""
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    return [(n, raw) for n, raw in enumerate(data.split(b"\n"), 1) if raw.strip(b" \t\r")]


class _NotStandardJSON(ValueError):
    pass


def _refuse_constant(name: str):
    raise _NotStandardJSON(f"{name} is not standard JSON")


def _object_without_duplicates(pairs):
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise _NotStandardJSON(f"duplicate key {k!r}")
        obj[k] = v
    return obj


def parse_line(number: int, raw: bytes, defaults: Dict[str, object]) -> Line:
    """Decode, parse and check one line; never raises (problems go to `Line.error`)."""
    from fineserve_jax.core.field_checks import InvalidRequest
    from fineserve_jax.core.request import Request
    from fineserve_jax.core.sampling_params import SamplingParams

    line = Line(number, raw)

    def bad(msg: str) -> Line:
        line.error = f"line {number}: {msg}"
        return line

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return bad(f"not valid UTF-8 (byte {e.start + 1} of the line, {raw[e.start:e.start + 1]!r}: "
                   f"{e.reason})")
    try:
        obj = json.loads(text, parse_constant=_refuse_constant,
                         object_pairs_hook=_object_without_duplicates)
    except RecursionError:
        return bad("not valid JSON: nested too deeply")
    except json.JSONDecodeError as e:
        return bad(f"not valid JSON: {e.msg} (column {e.colno})")
    except ValueError as e:  # NaN/Infinity, duplicate keys, a number too long to convert
        return bad(f"not valid JSON: {e}")
    if not isinstance(obj, dict):
        return bad(f"expected a JSON object with a 'prompt' field, got a JSON {type(obj).__name__}")
    if "prompt" not in obj:
        return bad("expected a JSON object with a 'prompt' field (no 'prompt')")
    fields = {**defaults, **{k: v for k, v in obj.items() if k != "prompt"}}
    try:
        sampling = SamplingParams.from_dict(fields)
        req = Request(model="model", prompt=obj["prompt"], sampling=sampling)
    except InvalidRequest as e:
        return bad(str(e))
    line.obj, line.prompt, line.sampling = obj, req.prompt, sampling
    return line


# -- output records -------------------------------------------------------------------------

def record_json(rec: dict) -> str:
    """One output line: standard JSON, ASCII only (a reader that splits on U+2028 or any other
    Unicode separator still sees one record per line). A value JSON cannot carry (NaN,
    Infinity) turns the record into an error record instead of being written bare."""
    try:
        return json.dumps(rec, ensure_ascii=True, allow_nan=False)
    except (ValueError, TypeError) as e:
        line = rec.get("line")
        return json.dumps({"line": line, "error": f"line {line}: result is not representable as "
                           f"standard JSON ({e})"}, ensure_ascii=True)


def result_record(line: Line, out) -> dict:
    """The record of a line that reached the engine (`out` is its RequestOutput)."""
    if out.status == "finished":
        return {"line": line.number, **line.obj, "text": out.text, "token_ids": out.token_ids,
                "finish_reason": out.finish_reason}
    return {"line": line.number, **line.obj,
            "error": f"line {line.number}: {out.error or out.status}"}


def error_record(line: Line) -> dict:
    return {"line": line.number, "error": line.error, "input": line.text}


# -- files ----------------------------------------------------------------------------------

def _same_file(a: str, b: str) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def read_input(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise _usage("input", f"cannot read {path!r}: {e.strerror or e}") from None


def _records_done(f, output: str, lines: Sequence[Line]) -> Tuple[int, int]:
    """For --resume: (number of complete records in the open output `f`, byte length they
    take). They must be the records of the first lines of this input (checked by `line`)."""
    f.seek(0)
    data = f.read()
    end = data.rfind(b"\n") + 1  # a record cut off by a crash is redone
    done = data[:end].split(b"\n")[:-1] if end else []
    if len(done) > len(lines):
        raise _usage("output", f"{output!r} holds {len(done)} records but the input has only "
                     f"{len(lines)} non-blank lines: not an earlier run on this input")
    for i, raw in enumerate(done):
        try:
            number = json.loads(raw).get("line")
        except (ValueError, AttributeError, RecursionError):
            number = None
        if number != lines[i].number:
            raise _usage("output", f"record {i + 1} of {output!r} is not that of input line "
                         f"{lines[i].number}: not an earlier run on this input; remove the file "
                         f"or drop --resume")
    return len(done), end


def open_output(opts: Options):
    """Create the output (truncated; kept as it is with --resume). Raises a usage error when
    it is the input file or cannot be written."""
    path = opts.output
    if _same_file(path, opts.input):
        raise _usage("output", f"{path!r} is the input file ({opts.input!r}); writing it would "
                     f"destroy the input")
    mode = os.O_CREAT | (os.O_RDWR if opts.resume else os.O_WRONLY | os.O_TRUNC)
    try:
        fd = os.open(path, mode, 0o666)
    except OSError as e:
        raise _usage("output", f"cannot write {path!r}: {e.strerror or e}") from None
    if opts.resume and not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _usage("resume", f"--output={path} is not a regular file")
    # A pipe or device (--output=/dev/stdout) is written as a stream; only files are resumed.
    return os.fdopen(fd, "r+b" if opts.resume else "wb")


def resume_point(f, opts: Options, lines: Sequence[Line]) -> int:
    """How many lines an earlier run already wrote (0 without --resume); the file is cut
    after their records and positioned there."""
    if not opts.resume:
        return 0
    done, keep = _records_done(f, opts.output, lines)
    f.truncate(keep)
    f.seek(keep)
    return done


# -- the run --------------------------------------------------------------------------------

def _generate_chunk(llm, chunk: Sequence[Line]):
    """RequestOutputs for the chunk's good lines (an exception the engine raises instead of
    failing one request is confined to a line-by-line retry of this chunk)."""
    try:
        return llm.generate([ln.prompt for ln in chunk], [ln.sampling for ln in chunk])
    except Exception as e:  # which line caused it is unknown: retry them one at a time
        if len(chunk) == 1:
            return [_Failed(f"engine error: {type(e).__name__}: {e}")]
    outs = []
    for ln in chunk:
        try:
            outs.append(llm.generate([ln.prompt], [ln.sampling])[0])
        except Exception as e:  # recorded on that line
            outs.append(_Failed(f"engine error: {type(e).__name__}: {e}"))
    return outs


@dataclasses.dataclass
class _Failed:
    error: str
    status: str = "failed"


def run_options(opts: Options, llm=None) -> int:
    """Generate for every line of `opts.input`; returns the number of error records written
    in this run. `llm`: an already built `LLM` (tests), else one is built from `opts`."""
    data = read_input(opts.input)
    f = open_output(opts)  # before parsing or loading: an unwritable path fails at once
    with f:
        defaults = dict(opts.defaults)
        lines = [parse_line(n, raw, defaults) for n, raw in split_lines(data)]
        done = resume_point(f, opts, lines)
        regular = stat.S_ISREG(os.fstat(f.fileno()).st_mode)  # fsync needs a file
        todo = lines[done:]
        if llm is None and any(ln.error is None for ln in todo):
            from fineserve_jax.engine.llm import LLM

            try:
                llm = LLM(model=opts.model, quant=opts.quant, attention_impl=opts.attention_impl,
                          dtype=opts.dtype, max_model_len=opts.max_model_len,
                          arena_bytes=opts.arena_bytes)
            except (ValueError, OSError) as e:  # a bad checkpoint or flag combination
                raise app.UsageError(f"cannot load --model={opts.model} --quant={opts.quant}: "
                                     f"{e}") from e
        bar = None
        if opts.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(lines), initial=done, unit="line", desc="generate")
        errors = 0
        for start in range(0, len(todo), opts.chunk_size):
            chunk = todo[start:start + opts.chunk_size]
            good = [ln for ln in chunk if ln.error is None]
            results = dict(zip((ln.number for ln in good), _generate_chunk(llm, good) if good else []))
            text = []
            for ln in chunk:
                rec = error_record(ln) if ln.error else result_record(ln, results[ln.number])
                errors += "error" in rec
                text.append(record_json(rec) + "\n")
            f.write("".join(text).encode("ascii"))
            f.flush()
            if regular:
                os.fsync(f.fileno())
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
    return errors


def run(model: str, quant: str, input_path: str, output_path: str, attention_impl="auto",
        max_model_len=512, dtype="float32", progress=True, **options) -> int:
    """Library entry point with the flags as arguments (`options`: arena_mib, chunk_size,
    resume and the sampling defaults); returns the number of error records."""
    return run_options(check_options(model=model, quant=quant, input=input_path, output=output_path,
                                     attention_impl=attention_impl, max_model_len=max_model_len,
                                     dtype=dtype, progress=progress, **options))


def options_from_flags(fv: flags.FlagValues) -> Options:
    return check_options(
        model=fv.model, quant=fv.quant, input=fv.input, output=fv.output,
        attention_impl=fv.attention_impl, max_model_len=fv.max_model_len, dtype=fv.dtype,
        arena_mib=fv.arena_mib, chunk_size=fv.chunk_size, resume=fv.resume, progress=fv.progress,
        **{k: fv[k].value for k in SAMPLING_FLAGS})


def cli(argv: Sequence[str], llm=None) -> int:
    """Parse `argv` (argv[0] is the program name) into fresh flags and run; in-process
    equivalent of the command line. Bad flags raise `app.UsageError`."""
    fv = flags.FlagValues()
    define_flags(fv)
    try:
        fv(list(argv))
    except flags.Error as e:
        raise app.UsageError(str(e)) from None
    return run_options(options_from_flags(fv), llm=llm)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    opts = options_from_flags(flags.FLAGS)
    errors = run_options(opts)
    print(f"wrote {opts.output}" + (f" ({errors} line(s) with errors)" if errors else ""),
          file=sys.stderr)


if __name__ == "__main__":
    define_flags()
    app.run(main)
