"""Run marked README blocks (see ``readme_blocks``) in one ``bash`` shell and report the first
that failed: a non-zero exit (naming the failing line), a command it started in the background
that failed (seen when the block ends), a timeout, or stdout contradicting its output block.

The shell is one process group: whatever the blocks leave running is stopped at the end.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from readme_blocks import Block, output_diff

from bench.common import stop_process_group


@dataclass
class Outcome:
    """What one block did: ``status`` None while it never ran (an earlier block failed)."""

    block: Block
    status: int | None = None
    stdout: str = ""
    stderr: str = ""
    jobs: str = ""
    seconds: float | None = None  # wall time of a block that ran to its end
    notes: list[str] = field(default_factory=list)


PRELUDE = r"""set -Eeuo pipefail
shopt -s inherit_errexit
_RT_HTTP_ERRORS=0
trap 'if [[ ${FUNCNAME[0]:-} == curl ]]; then echo "${BASH_LINENO[0]} curl $*";
      else echo "$LINENO $BASH_COMMAND"; fi > "$_RT/failed"' ERR
curl() {  # a 4xx/5xx answer fails the block, unless it is marked http-errors or asks for -f
  local a
  if [[ $_RT_HTTP_ERRORS == 1 ]]; then command curl "$@"; return; fi
  for a in "$@"; do
    case $a in --fail|--fail-with-body) command curl "$@"; return;; --*) ;;
               -*f*) command curl "$@"; return;; esac
  done
  command curl --fail-with-body "$@"
}
"""

STEP = r"""echo {n} > "$_RT/current"
echo "$EPOCHREALTIME" > "$_RT/{n}.t0"
_RT_HTTP_ERRORS={http_errors}
{{ . "$_RT/block-{n}.sh"; }} > "$_RT/{n}.log" 2> "$_RT/{n}.errlog" < /dev/null
cp "$_RT/{n}.log" "$_RT/{n}.out"; cp "$_RT/{n}.errlog" "$_RT/{n}.err"
echo "$EPOCHREALTIME" > "$_RT/{n}.t1"
jobs -l > "$_RT/{n}.jobs"
if grep -Eq '\bExit [0-9]+' "$_RT/{n}.jobs"; then exit 99; fi
"""
BACKGROUND_FAILED = 99


def _driver(blocks: list[Block], state: Path) -> str:
    steps = []
    for n, b in enumerate(blocks, 1):
        (state / f"block-{n}.sh").write_text(b.code)
        steps.append(STEP.format(n=n, http_errors=int(b.http_errors)))
    return PRELUDE + f'_RT="{state}"\n' + "".join(steps) + 'echo done > "$_RT/current"\n'


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _seconds(state: Path, n: int) -> float | None:
    t0, t1 = _read(state / f"{n}.t0").strip(), _read(state / f"{n}.t1").strip()
    return float(t1) - float(t0) if t0 and t1 else None


def _failed_command(state: Path, block: Block) -> list[str]:
    """Where the ERR trap saw the block fail, as ``LINE: COMMAND`` in the Markdown file."""
    line, _, command = _read(state / "failed").strip().partition(" ")
    if not line.isdigit() or command.startswith('. "'):  # the block's last line as a whole
        return []
    return [f"line {block.line + int(line)}: {command}"]


def _contradicted(block: Block, state: Path, n: int) -> bool:
    return block.expected is not None and output_diff(
        block.expected, _read(state / f"{n}.out"), structure=block.structure) is not None


def _watch(proc: subprocess.Popen[bytes], blocks: list[Block], state: Path) -> int | None:
    """Wait for the driver, or stop waiting at the first block that printed the wrong thing;
    the 1-based block that ran past its timeout, or None."""
    current, started, checked = "", time.monotonic(), 0
    while proc.poll() is None:
        now = _read(state / "current").strip()
        if now != current:
            current, started = now, time.monotonic()
        finished = int(current) - 1 if current.isdigit() else 0
        for n in range(checked + 1, finished + 1):
            if _contradicted(blocks[n - 1], state, n):
                return None  # first_failure reports it: it comes before the block now running
        checked = max(checked, finished)
        if current.isdigit() and time.monotonic() - started > blocks[int(current) - 1].timeout_s:
            return int(current)
        time.sleep(0.2)
    return None


def run_blocks(blocks: list[Block], cwd: Path, env: Mapping[str, str],
               state: Path) -> list[Outcome]:
    """Run ``blocks`` in order in one shell in ``cwd``; what each did (``state``: a scratch
    folder for the scripts and logs). Stops at the first failing block."""
    state.mkdir(parents=True, exist_ok=True)
    script = state / "driver.sh"
    script.write_text(_driver(blocks, state))
    proc = subprocess.Popen(["bash", str(script)], cwd=cwd, env=dict(env),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=(state / "driver.err").open("wb"), start_new_session=True)
    try:
        timed_out = _watch(proc, blocks, state)
    finally:
        stop_process_group(proc)
    current = _read(state / "current").strip()
    outcomes = []
    for n, b in enumerate(blocks, 1):
        o = Outcome(b, stdout=_read(state / f"{n}.out"), stderr=_read(state / f"{n}.err"),
                    jobs=_read(state / f"{n}.jobs"), seconds=_seconds(state, n))
        if current == "done" or (current.isdigit() and n < int(current)):
            o.status = 0
        elif current == str(n) or (n == 1 and not current.isdigit()):
            o.status = proc.returncode if timed_out is None else -1
            if not o.stdout and not o.stderr:  # interrupted before the copy
                o.stdout, o.stderr = _read(state / f"{n}.log"), _read(state / f"{n}.errlog")
            if not current:
                o.notes.append(f"the shell failed first: {_read(state / 'driver.err')}")
            elif timed_out == n:
                o.notes.append(f"still running after {b.timeout_s:.0f} s")
            elif proc.returncode == BACKGROUND_FAILED and o.jobs:
                o.notes.append(f"a command it started in the background failed: {o.jobs}")
            else:
                o.notes.extend(_failed_command(state, b))
        outcomes.append(o)
    return outcomes


def _tail(text: str, limit: int = 3000) -> str:
    return text if len(text) <= limit else "..." + text[-limit:]


def first_failure(outcomes: list[Outcome], name: str = "README.md") -> str | None:
    """A report on the first block that failed or contradicted its output block, or None."""
    for o in outcomes:
        b = o.block
        if o.status is None:
            return f"{name}:{b.line}: the block did not run (an earlier block ended the shell)"
        if o.status != 0:
            own = o.status > 0 and o.status != BACKGROUND_FAILED  # not the test's own code
            why = "; ".join(([f"exit status {o.status}"] if own else []) + o.notes)
            return (f"{name}:{b.line}: the block failed ({why}):\n{b.code}"
                    f"--- stdout ---\n{_tail(o.stdout)}\n--- stderr ---\n{_tail(o.stderr)}")
        if b.expected is not None and (diff := output_diff(b.expected, o.stdout,
                                                           structure=b.structure)):
            return (f"{name}:{b.line}: the output contradicts {name}:{b.expected_line}: {diff}"
                    f"\n{b.code}--- stderr ---\n{_tail(o.stderr)}")
    return None
