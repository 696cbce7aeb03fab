"""The offline CLI (`python -m fineserve_jax.generate`): every kind of bad line becomes an error
record on its own line and the rest go on; output is standard JSON, one record per non-blank
input line, in order; bad flags and paths fail before any work; results survive a crash.

Most tests run the CLI in-process with one shared tiny-llama `LLM` (random weights, byte
tokenizer); one runs the real command line in a subprocess (the issue's must-show).
"""

import json
import os
import subprocess
import sys

import pytest
from absl import app
from hypothesis import given, settings
from hypothesis import strategies as st

from fineserve_jax import generate
from fineserve_jax.generate import cli, parse_line, record_json, split_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def strict_loads(text):
    """json.loads that refuses NaN/Infinity (what a standard JSON reader does)."""
    def refuse(name):
        raise ValueError(f"non-standard constant {name}")
    return json.loads(text, parse_constant=refuse)


def read_records(path):
    data = open(path, "rb").read()
    data.decode("ascii")  # standard JSON, ASCII only
    assert data.endswith(b"\n")
    return [strict_loads(x) for x in data.split(b"\n")[:-1]]


# The mixed file: (bytes of the line, None for a good line or a substring of the error;
# "blank" for a line that must produce no record).
MIXED = [
    (json.dumps({"prompt": "Hello"}).encode(), None),
    (b"{not json", "not valid JSON"),
    (b'{"prompt": "caf\xe9 au lait"}', "not valid UTF-8"),
    ('{"prompt": "one\u2028two\u2029three", "max_tokens": 3}'.encode("utf-8"), None),
    (b"", "blank"),
    (b"  \t \r", "blank"),
    (json.dumps({"prompt": [1, 2, 3], "top_k": 2**31}).encode(), "top_k must be"),
    (json.dumps({"prompt": "x", "max_tokens": 0}).encode(), "max_tokens must be"),
    (json.dumps({"prompt": "x", "temperature": "0.5"}).encode(), "temperature must be"),
    (b'{"prompt": "\\ud800 lone"}', "surrogates not allowed"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"prompt": "x", "temperature": NaN}', "NaN is not standard JSON"),
    (b'{"prompt": "x", "top_p": 1e999}', "top_p must be"),  # parses as inf
    (json.dumps({"prompt": [5, 6, 7], "temperature": 0.7, "seed": 3}).encode(), None),
    (b'"just a string"', "expected a JSON object"),
    (json.dumps({"text": "no prompt"}).encode(), "'prompt'"),
    (json.dumps({"prompt": "x", "bogus": 1}).encode(), "unknown sampling field"),
    (b'{"prompt": "a", "prompt": "b"}', "duplicate key"),
    (json.dumps({"prompt": [1, 99999]}).encode(), "out of range"),  # the engine's vocab check
    (b"\r", "blank"),
    (json.dumps({"prompt": "last line, no newline"}).encode(), None),
]


def write_mixed(path):
    path.write_bytes(b"\n".join(raw for raw, _ in MIXED))  # no final newline
    return [(n, want) for n, (_, want) in enumerate(MIXED, 1) if want != "blank"]


def check_mixed(records, expected):
    assert [r["line"] for r in records] == [n for n, _ in expected]
    for rec, (n, want) in zip(records, expected):
        if want is None:
            assert "error" not in rec, rec
            assert rec["finish_reason"] in ("length", "stop") and 1 <= len(rec["token_ids"]) <= 8
            assert isinstance(rec["text"], str)
        else:
            assert want in rec["error"] and rec["error"].startswith(f"line {n}: "), (n, rec)


@pytest.fixture(scope="module")
def llm():
    from fineserve_jax.core.buckets import Buckets
    from fineserve_jax.engine.llm import LLM

    return LLM(model="tiny-llama", quant="org", dtype="float32", max_model_len=64,
               tokens_per_block=4, buckets=Buckets(decode_sizes=(4,), prefill_sizes=(64,),
                                                   prefill_seqs=4))


def test_must_show_command_line_on_a_mixed_file(tmp_path):
    """`python -m fineserve_jax.generate --input=X --output=Y --max_tokens=8` writes one line
    per non-blank input line, in order, with errors on exactly the bad ones."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    expected = write_mixed(inp)
    proc = subprocess.run(
        [sys.executable, "-m", "fineserve_jax.generate", f"--input={inp}", f"--output={out}",
         "--max_tokens=8", "--max_model_len=64", "--noprogress"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bad = sum(want is not None for _, want in expected)
    assert f"({bad} line(s) with errors)" in proc.stderr
    check_mixed(read_records(out), expected)


def test_mixed_file_in_process_with_chunks(tmp_path, llm):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    expected = write_mixed(inp)
    errors = cli(["generate", f"--input={inp}", f"--output={out}", "--max_tokens=8",
                  "--chunk_size=3", "--noprogress"], llm=llm)
    assert errors == sum(want is not None for _, want in expected)
    recs = read_records(out)
    check_mixed(recs, expected)
    assert recs[3]["prompt"] == "one\u2028two\u2029three"  # U+2028 stayed inside its string
    assert "\\xe9" in recs[2]["input"]  # the undecodable byte is shown, not dropped


@pytest.mark.parametrize("raw,want", [(raw, want) for raw, want in MIXED
                                      if want not in (None, "blank", "out of range")])
def test_parse_line_reports_each_bad_line(raw, want):
    line = parse_line(7, raw, {})
    assert line.obj is None and line.error.startswith("line 7: ") and want in line.error


def test_split_lines_splits_on_newline_only_and_keeps_real_line_numbers():
    data = b"\xef\xbb\xbf" + "a\u2028b\u0085c\x0cd\n\n  \r\nx\r\ny".encode("utf-8")
    assert split_lines(data) == [(1, "a\u2028b\u0085c\x0cd".encode("utf-8")), (4, b"x\r"), (5, b"y")]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64) | st.text(max_size=40).map(lambda s: s.encode("utf-8", "surrogatepass"))
       | st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                      lambda c: st.lists(c, max_size=3) | st.dictionaries(
                          st.sampled_from(["prompt", "max_tokens", "temperature", "top_p", "top_k",
                                           "seed", "stop_token_ids", "ignore_eos", "x"]), c, max_size=4),
                      max_leaves=8).map(lambda o: json.dumps(o).encode()))
def test_parse_line_never_raises_and_good_lines_are_checked(raw):
    line = parse_line(3, raw, {"max_tokens": 4})
    if line.error is None:
        assert isinstance(line.obj, dict)
        assert isinstance(line.prompt, (str, list)) and line.sampling.max_tokens >= 1
    else:
        assert line.error.startswith("line 3: ") and line.obj is None
    rec = generate.error_record(line) if line.error else {"line": 3, **line.obj}
    strict_loads(record_json(rec))


def test_record_json_never_writes_nan_or_infinity():
    text = record_json({"line": 4, "text": "ok", "score": float("nan")})
    rec = strict_loads(text)
    assert rec == {"line": 4, "error": rec["error"]} and "line 4" in rec["error"]
    assert "NaN" not in text and "Infinity" not in text
    assert record_json({"line": 1, "text": "\u2028\ud800é"}).isascii()


def test_flag_defaults_apply_to_lines_that_omit_a_field(tmp_path, llm):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(json.dumps(o) for o in [
        {"prompt": [1, 5, 9], "ignore_eos": True},
        {"prompt": [1, 5, 9], "ignore_eos": True, "max_tokens": 5},
        {"prompt": [1, 5, 9], "ignore_eos": True, "temperature": 0.0},
    ]) + "\n")
    assert cli(["generate", f"--input={inp}", f"--output={out}", "--max_tokens=3",
                "--temperature=1.0", "--top_k=5", "--top_p=0.9", "--seed=11", "--noprogress"],
               llm=llm) == 0
    a, b, c = read_records(out)
    assert len(a["token_ids"]) == 3 and len(b["token_ids"]) == 5 and len(c["token_ids"]) == 3
    assert b["token_ids"][:3] == a["token_ids"]  # same defaulted seed and sampling fields
    line = parse_line(1, b'{"prompt": "x", "top_k": 2}', {"max_tokens": 3, "top_k": 5, "seed": 11})
    assert (line.sampling.max_tokens, line.sampling.top_k, line.sampling.seed) == (3, 2, 11)


@pytest.mark.parametrize("argv,flag", [
    (["--max_model_len=0"], "--max_model_len"),
    (["--max_model_len=-1"], "--max_model_len"),
    (["--max_model_len=100000000000"], "--max_model_len"),
    (["--max_tokens=0"], "--max_tokens"),
    (["--max_tokens=4294967296"], "--max_tokens"),
    (["--temperature=nan"], "--temperature"),
    (["--temperature=-1"], "--temperature"),
    (["--top_p=0"], "--top_p"),
    (["--top_p=inf"], "--top_p"),
    (["--top_k=-1"], "--top_k"),
    (["--top_k=2147483648"], "--top_k"),
    (["--seed=-1"], "--seed"),
    (["--chunk_size=0"], "--chunk_size"),
    (["--arena_mib=0"], "--arena_mib"),
    (["--quant=fp3"], "--quant"),
    (["--dtype=float8"], "--dtype"),
    (["--attention_impl=magic"], "--attention_impl"),
    (["--max_tokens=abc"], "max_tokens"),  # absl's own parse error, still names the flag
    (["--input="], "--input"),
])
def test_bad_flags_are_usage_errors_naming_the_flag(tmp_path, argv, flag):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "x"}\n')
    out = tmp_path / "out.jsonl"
    with pytest.raises(app.UsageError, match=flag):
        cli(["generate", f"--input={inp}", f"--output={out}", *argv])
    assert not out.exists()  # refused before anything was written


def test_missing_output_flag_is_a_usage_error(tmp_path):
    with pytest.raises(app.UsageError, match="--output"):
        cli(["generate", f"--input={tmp_path / 'in.jsonl'}"])


@pytest.mark.parametrize("link", ["same", "symlink", "hardlink", "dotdot"])
def test_output_equal_to_input_is_refused_and_input_kept(tmp_path, link):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "x"}\n')
    out = {"same": lambda: inp, "dotdot": lambda: tmp_path / "sub" / ".." / "in.jsonl",
           "symlink": lambda: (tmp_path / "ln.jsonl").symlink_to(inp) or tmp_path / "ln.jsonl",
           "hardlink": lambda: os.link(inp, tmp_path / "hl.jsonl") or tmp_path / "hl.jsonl"}[link]()
    (tmp_path / "sub").mkdir()
    with pytest.raises(app.UsageError, match="--output.*is the input file"):
        cli(["generate", f"--input={inp}", f"--output={out}"])
    assert inp.read_text() == '{"prompt": "x"}\n'


class _NoModel:
    """Stands in for the LLM class to prove it is never constructed."""

    def __init__(self, *a, **k):
        raise AssertionError("the model was loaded before the output was checked")


@pytest.mark.parametrize("where", ["missing_dir", "a_directory", "parent_is_a_file"])
def test_unwritable_output_fails_before_the_model_loads(tmp_path, monkeypatch, where):
    import fineserve_jax.engine.llm as llm_module

    monkeypatch.setattr(llm_module, "LLM", _NoModel)
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "x"}\n')
    if where == "missing_dir":
        out = tmp_path / "nope" / "out.jsonl"
    elif where == "a_directory":
        out = tmp_path / "adir"
        out.mkdir()
    else:  # (a read-only directory would not stop root, who runs CI containers)
        (tmp_path / "plain_file").write_text("")
        out = tmp_path / "plain_file" / "out.jsonl"
    with pytest.raises(app.UsageError, match=f"--output: cannot write '{out}'"):
        cli(["generate", f"--input={inp}", f"--output={out}"])


def test_output_is_created_before_the_model_loads(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"prompt": "x"}\n')
    with pytest.raises(app.UsageError, match="cannot load --model="):
        cli(["generate", f"--input={inp}", f"--output={out}", f"--model={tmp_path / 'no_ckpt'}"])
    assert out.exists()


def test_unreadable_input_is_a_usage_error(tmp_path):
    out = tmp_path / "out.jsonl"
    with pytest.raises(app.UsageError, match="--input: cannot read"):
        cli(["generate", f"--input={tmp_path / 'missing.jsonl'}", f"--output={out}"])
    assert not out.exists()


class _DiesOnSecondChunk:
    """The real LLM, but the process "dies" (an exception nothing catches) on chunk 2; what
    another reader sees in the output file at that moment is kept in `on_disk` (a SIGKILL would
    leave exactly that: nothing buffered in the process survives it)."""

    def __init__(self, llm, output):
        self.llm, self.output, self.calls, self.on_disk = llm, output, 0, None

    def generate(self, prompts, params):
        self.calls += 1
        if self.calls == 2:
            self.on_disk = self.output.read_bytes()
            raise KeyboardInterrupt("killed")
        return self.llm.generate(prompts, params)


def _numbered_input(path, n):
    path.write_text("\n".join(json.dumps({"prompt": [1, 2 + i], "max_tokens": 2}) for i in range(n)) + "\n")


def test_results_written_before_a_crash_survive_and_resume_finishes(tmp_path, llm):
    inp, out, ref = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "ref.jsonl"
    _numbered_input(inp, 7)
    argv = ["generate", f"--input={inp}", "--chunk_size=3", "--noprogress"]
    cli(argv + [f"--output={ref}"], llm=llm)
    dying = _DiesOnSecondChunk(llm, out)
    with pytest.raises(KeyboardInterrupt):
        cli(argv + [f"--output={out}"], llm=dying)
    assert dying.on_disk == b"".join(ref.read_bytes().splitlines(keepends=True)[:3])  # chunk 1
    out.write_bytes(dying.on_disk + b'{"line": 4, "tex')  # and a record cut off mid-write
    cli(argv + [f"--output={out}", "--resume"], llm=llm)
    assert out.read_bytes() == ref.read_bytes()
    cli(argv + [f"--output={out}", "--resume"], llm=llm)  # nothing left to do
    assert out.read_bytes() == ref.read_bytes()


def test_resume_refuses_an_output_of_another_input(tmp_path, llm):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _numbered_input(inp, 3)
    out.write_text('{"line": 2, "text": "from some other file"}\n')
    with pytest.raises(app.UsageError, match="--output: record 1 .* not that of input line 1"):
        cli(["generate", f"--input={inp}", f"--output={out}", "--resume"], llm=llm)
    assert out.read_text() == '{"line": 2, "text": "from some other file"}\n'


class _RaisesOnPrompt:
    """The real LLM, except that generating `poison` raises (an engine fault on one request)."""

    def __init__(self, llm, poison):
        self.llm, self.poison = llm, poison

    def generate(self, prompts, params):
        if self.poison in prompts:
            raise RuntimeError("device step failed")
        return self.llm.generate(prompts, params)


def test_an_engine_exception_is_confined_to_its_line(tmp_path, llm):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _numbered_input(inp, 4)
    errors = cli(["generate", f"--input={inp}", f"--output={out}", "--noprogress"],
                 llm=_RaisesOnPrompt(llm, [1, 4]))
    recs = read_records(out)
    assert errors == 1 and [("error" in r) for r in recs] == [False, False, True, False]
    assert recs[2]["error"] == "line 3: engine error: RuntimeError: device step failed"


def test_legacy_run_signature_still_works(tmp_path):
    """`generate.run(model, quant, input, output, ...)` (positional) stays a library entry."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("{broken\n")
    assert generate.run("tiny-llama", "org", str(inp), str(out), progress=False) == 1
    assert read_records(out)[0]["error"].startswith("line 1: not valid JSON")


def test_output_to_a_device_is_streamed_but_not_resumable(tmp_path, llm):
    inp = tmp_path / "in.jsonl"
    _numbered_input(inp, 2)
    assert cli(["generate", f"--input={inp}", "--output=/dev/null", "--noprogress"], llm=llm) == 0
    with pytest.raises(app.UsageError, match="--resume: --output=/dev/null is not a regular file"):
        cli(["generate", f"--input={inp}", "--output=/dev/null", "--resume"], llm=llm)
