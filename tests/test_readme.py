"""The README is a tested path: its marked shell blocks run in order and print what it says.

To make a README shell block run, put ``<!-- readme-test -->`` on the line right before its
```` ```bash ```` fence (options after the word: ``http-errors`` lets a curl answer of 4xx/5xx
pass, ``timeout=SECONDS``); to check what it prints, put ``<!-- readme-test output -->`` (or
``output structure``, for answers that depend on a fit) right before the fenced block after
it that shows the output: JSON is compared by keys, list lengths, strings, booleans and nulls
(any number where a number is shown, ``...`` matching any text), other text line by line.
Blocks without a marker (installation, Docker, the test command itself, GPU benchmarks) do
not run. The details are in ``tests/readme_blocks.py``; ``tests/readme_runner.py`` runs them.

``test_readme_blocks_run_in_order`` runs every marked block of README.md in one ``bash``
shell, in the order written, so files, variables and background servers carry over from one
block to the next, in a copy of this checkout's files (tracked, and untracked ones git does
not ignore) in a scratch folder, as a reader with a fresh clone would. The README's
installation block does not run: the blocks use this interpreter's environment (first on
``PATH``, the copy on ``PYTHONPATH``), where the project is installed already. Servers are real
processes; loopback ports are mapped to free ones; ``$REPROGRAM_BUDGET_CAP`` caps every
``reprogram fit --budget`` so that the long fits run short (the README need not mention it).
The other tests check the mechanism itself on small made-up files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from readme_blocks import Block, ReadmeError, json_diff, map_ports, output_diff, parse
from readme_runner import first_failure, run_blocks

from bench.common import free_port
from reprogram.commands import BUDGET_CAP_ENV, capped_budget
from reprogram.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
# image queries per README fit in this test (the README asks for 100k+): enough for the
# smallest fit it shows, one BPT-VLM generation (31 candidates x 64 images) and two validations
# of 180 images, 2,344
FIT_BUDGET_CAP = 2500


def checkout_copy(dest: Path) -> Path:
    """The checkout's files as a fresh clone has them (plus untracked, not ignored ones)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def block_env(checkout: Path) -> dict[str, str]:
    """The environment the blocks run in: this interpreter's first on PATH, no REPROGRAM_*
    settings of the caller's, long fits capped."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPROGRAM_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(checkout)
    env[BUDGET_CAP_ENV] = str(FIT_BUDGET_CAP)
    return env


def run_markdown(text: str, tmp_path: Path) -> str | None:
    require_tools()
    blocks = parse(text, "test.md")
    map_ports(blocks, free_port)
    work = tmp_path / "work"
    work.mkdir(parents=True, exist_ok=True)
    outcomes = run_blocks(blocks, work, block_env(ROOT), tmp_path / "state")
    return first_failure(outcomes, "test.md")


def require_tools() -> None:
    """Fail (under ``REPROGRAM_REQUIRE_ALL=1``, as in CI) or skip without bash, curl, git or
    a git checkout."""
    missing = [tool for tool in ("bash", "curl", "git") if shutil.which(tool) is None]
    if missing or not (ROOT / ".git").exists():
        reason = (f"expected {', '.join(missing)} on PATH (scripts/apt-packages.txt)" if missing
                  else f"expected a git checkout at {ROOT}, to copy its tracked files")
        if os.environ.get("REPROGRAM_REQUIRE_ALL") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.mark.slow
def test_readme_blocks_run_in_order(tmp_path: Path) -> None:
    require_tools()
    blocks = parse((ROOT / "README.md").read_text())
    assert len(blocks) >= 5, "expected the README's runnable blocks to carry markers"
    map_ports(blocks, free_port)
    checkout = checkout_copy(tmp_path / "checkout")
    outcomes = run_blocks(blocks, checkout, block_env(checkout), tmp_path / "state")
    failure = first_failure(outcomes)
    assert failure is None, failure


# -- the mechanism ---------------------------------------------------------------------------

RUN = "<!-- readme-test -->\n```bash\n{}\n```\n"
OUT = "<!-- readme-test output -->\n```\n{}\n```\n"


def test_state_carries_over_and_output_matches(tmp_path: Path) -> None:
    text = (RUN.format("X=41\ntouch made.txt") + "prose\n\n"
            + RUN.format('echo "{\\"n\\": $((X + 1)), \\"file\\": \\"$(ls made.txt)\\"}"')
            + OUT.format('{"n": 7, "file": "made..."}')
            + "```bash\nfalse  # not marked: never runs\n```\n"
            + "```markdown\n<!-- readme-test -->\n```\n")  # a marker shown, not used
    assert run_markdown(text, tmp_path) is None


@pytest.mark.parametrize("code", ["true\nfalse\necho never", "ls missing-file",
                                  "echo ok | false", "python -m json.tool --renamed-flag",
                                  "Y=$(false; echo 1)", "echo $UNSET_VARIABLE"])
def test_a_failing_command_fails_its_block(tmp_path: Path, code: str) -> None:
    text = RUN.format("echo first") + RUN.format(code) + RUN.format("echo third")
    failure = run_markdown(text, tmp_path)
    assert failure is not None and failure.startswith("test.md:6: the block failed"), failure


def test_the_failing_line_is_named(tmp_path: Path) -> None:
    text = RUN.format("echo first") + RUN.format("true\ncurl -s -F files=@missing.png http://x/")
    failure = run_markdown(text, tmp_path)
    expected = "test.md:6: the block failed (exit status 26; line 8: curl -s -F files=@missing"
    assert failure is not None and failure.startswith(expected), failure


def test_a_contradicting_output_fails_without_running_on(tmp_path: Path) -> None:
    text = (RUN.format("""echo '{"id": "abc", "ok": true}'""") + OUT.format('{"ident": "abc"}')
            + RUN.format("sleep 60"))
    t0 = time.monotonic()
    failure = run_markdown(text, tmp_path)
    assert failure is not None and "expected keys ['ident'], got ['id', 'ok']" in failure
    assert time.monotonic() - t0 < 30, "expected the run to stop at the contradiction"


def test_a_failed_background_command_fails_the_block(tmp_path: Path) -> None:
    text = RUN.format("(sleep 0.2; exit 3) &\nsleep 1") + RUN.format("echo later")
    failure = run_markdown(text, tmp_path)
    assert failure is not None and "in the background failed" in failure, failure


def test_a_block_past_its_timeout_fails(tmp_path: Path) -> None:
    text = "<!-- readme-test timeout=1 -->\n```bash\nsleep 30\n```\n"
    failure = run_markdown(text, tmp_path)
    assert failure is not None and "still running after 1 s" in failure, failure


@pytest.mark.slow
def test_curl_http_errors_fail_unless_marked(tmp_path: Path) -> None:
    serve = ("import http.server as h, sys; h.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[2])),"
             " h.SimpleHTTPRequestHandler).serve_forever()")
    start = (f'python -c "{serve}" --port 8000 > http.log 2>&1 &\n'
             "curl -sf --retry 30 --retry-connrefused --retry-delay 1 -o /dev/null "
             "http://127.0.0.1:8000/\n")
    missing = 'curl -s "http://127.0.0.1:8000/missing"'
    failure = run_markdown(RUN.format(start + missing), tmp_path / "a")
    assert failure is not None and "exit status 22" in failure, failure
    allowed = "<!-- readme-test http-errors -->\n```bash\n" + missing + "\n```\n"
    assert run_markdown(RUN.format(start) + allowed, tmp_path / "b") is None


def test_ports_map_to_free_ports_consistently() -> None:
    text = (RUN.format("srv --port 8000 &\ncurl http://127.0.0.1:8000/x localhost:8080/y")
            + OUT.format("listening on 127.0.0.1:8000"))
    blocks = parse(text)
    mapping = map_ports(blocks, iter([41000, 41000, 41001]).__next__)
    assert mapping == {8000: 41000, 8080: 41001}
    assert blocks[0].code == "srv --port 41000 &\ncurl http://127.0.0.1:41000/x localhost:41001/y\n"
    assert blocks[0].expected == "listening on 127.0.0.1:41000\n"


@pytest.mark.parametrize(("text", "message"), [
    ("<!-- readme_test -->\n```bash\ntrue\n```\n", "expected '<!-- readme-test [options] -->'"),
    ("<!--readme test-->\n```bash\ntrue\n```\n", "expected '<!-- readme-test [options] -->'"),
    ("<!-- readme-test backgroud -->\n```bash\ntrue\n```\n", "got 'backgroud'"),
    ("<!-- readme-test -->\n\n```bash\ntrue\n```\n", "expected a fenced block"),
    ("<!-- readme-test -->\n```python\nprint()\n```\n", "expected a bash block"),
    ("<!-- readme-test output -->\n```\nx\n```\n", "expected a run block before"),
    ("<!-- readme-test -->\n```bash\ntrue\n", "expected a closing ```"),
])
def test_bad_markup_is_an_error(text: str, message: str) -> None:
    with pytest.raises(ReadmeError, match=r"^test\.md:1: ") as err:
        parse(text, "test.md")
    assert message in str(err.value)


def test_parse_reads_options_and_lines() -> None:
    blocks = parse("# t\n" + RUN.format("a") + "<!-- readme-test http-errors timeout=5 -->\n"
                   "```bash\nb\n```\n" + OUT.format("B"))
    assert [(b.line, b.code, b.http_errors, b.timeout_s, b.expected) for b in blocks] == [
        (3, "a\n", False, 300.0, None), (7, "b\n", True, 5.0, "B\n")]
    assert isinstance(blocks[0], Block)


@pytest.mark.parametrize(("want", "got", "diff"), [
    ({"a": 1, "b": "x"}, {"a": 2.5, "b": "x"}, None),
    ({"a": 1}, {"a": "1"}, "$.a: expected number 1, got string '1'"),
    ({"a": True}, {"a": False}, "$.a: expected True, got False"),
    ({"a": None}, {"a": 0}, "$.a: expected None, got number 0"),
    ({"id": "req-1"}, {"id": "req-2"}, "$.id: expected 'req-1', got 'req-2'"),
    ({"id": "..."}, {"id": "0f3a"}, None),
    ({"p": "x...z"}, {"p": "xyz"}, None),
    ({"a": 1, "...": "..."}, {"a": 1, "b": 2}, None),
    ({"a": 1, "...": "..."}, {"b": 2}, "$: expected keys ['a'], got ['b']"),
    ({"l": [1, 2]}, {"l": [1]}, "$.l: expected 2 items, got 1"),
    ({"l": ["..."]}, {"l": [1, "x"]}, None),
    ({"l": [{"k": "v"}]}, {"l": [{"k": "w"}]}, "$.l[0].k: expected 'v', got 'w'"),
])
def test_json_diff(want: object, got: object, diff: str | None) -> None:
    assert json_diff(want, got) == diff


def test_structure_compares_keys_lengths_and_kinds_only() -> None:
    want = '{"label": "8", "ok": true, "top": [{"label": "8"}]}'
    assert output_diff(want, '{"label": "3", "ok": false, "top": [{"label": "3"}]}',
                       structure=True) is None
    assert output_diff(want, '{"label": 3, "ok": true, "top": [{"label": "8"}]}',
                       structure=True) == "$.label: expected string '8', got number 3"
    assert output_diff(want, '{"label": "8", "ok": true, "top": []}',
                       structure=True) == "$.top: expected 1 items, got 0"
    blocks = parse(RUN.format("x") + "<!-- readme-test output structure -->\n```\n{}\n```\n")
    assert blocks[0].structure


def test_output_diff_reads_back_to_back_documents_and_text() -> None:
    assert output_diff('{"a": 1}\n{"b": 2}', '{"a":3}{"b":4}') is None
    assert output_diff('{"a": 1}', '{"a":3}{"b":4}') == "expected 1 JSON documents, got 2"
    assert output_diff('{"a": 1}', "oops") == "expected JSON, got 'oops'"
    assert output_diff("heldout ... (matches)", "heldout 0.99, sha 6f  (matches)\n") is None
    assert output_diff("line one\n...\nend", "line one\nx\ny\nend") is None
    assert output_diff("heldout 0.99", "heldout 0.98") is not None


def test_budget_cap_changes_nothing_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BUDGET_CAP_ENV, raising=False)
    assert capped_budget(100_000) == 100_000 and capped_budget(None) is None
    monkeypatch.setenv(BUDGET_CAP_ENV, "2000")
    assert (capped_budget(100_000), capped_budget(500), capped_budget(None)) == (2000, 500, None)
    monkeypatch.setenv(BUDGET_CAP_ENV, "many")
    with pytest.raises(ConfigError, match="expected an integer in \\$REPROGRAM_BUDGET_CAP"):
        capped_budget(100_000)


def _tables(text: str) -> list[list[list[str]]]:
    """Markdown tables of ``text``: rows of cells, the header first."""
    tables, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            if not set(line) <= set("|- "):
                current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables + ([current] if current else [])


def test_every_sweep_table_ranks_by_validation_accuracy() -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("**The sweep that chose the defaults**"):]
    section = section[: section.index("The learned linear label map matters most")]
    sweeps = _tables(section)
    assert len(sweeps) >= 3
    for table in sweeps:
        header, rows = table[0], table[1:]
        assert header[1].startswith("validation") and header[2].startswith("test"), header
        values = [float(row[1].strip("*")) for row in rows]
        assert values == sorted(values, reverse=True), f"not ranked by validation: {header}"
