"""Schema-based fuzzing: schemathesis against a live ``reprogram-server`` and its OpenAPI schema.

``python -m bench.fuzz`` starts the server on a free loopback port with an API key and a
prompts folder holding one (public) prompt, then runs ``schemathesis run`` on
``/openapi.json`` with every phase (examples, coverage, fuzzing, stateful) and the checks
:data:`CHECKS`: no 5xx; every status, content type, header and body as the schema declares;
401 without the key (``ignored_auth``). A ``schemathesis.toml`` gives the key for both
security schemes and draws path parameters half of the time from the real names
(``default``, the prompt's id, version ``1``), so that requests reach the handlers and not
only the 404. It prints schemathesis' summary and exits with its status. The full run
(default ``--max-examples 100``) generates well over 2,000 requests; ``--max-examples 6`` is
the bounded form the test suite runs. Loopback only; the server process is always stopped.
``--print-command`` prints the equivalent ``schemathesis`` command line.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from bench.common import server_process
from reprogram.artifact import Prompt, dump_prompt
from reprogram.labelmaps import LabelMapSpec, build_labelmap
from reprogram.pipeline import Reprogrammer
from reprogram.programs import ProgramSpec, build_program
from reprogram.zoo.registry import load_model

CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_headers_conformance", "response_schema_conformance", "ignored_auth")
FUZZ_KEY = "fuzz-key-0123456789abcdef"
CONFIG = """\
[auth.openapi.bearer]
bearer = "{key}"

[auth.openapi.apiKey]
api_key = "{key}"

[dictionaries]
models = {{ values = ["default", "{pid}"] }}
versions = {{ values = ["1"] }}
prompts = {{ values = ["{pid}"] }}

[parameters]
"path.model_name" = {{ dictionary = "models", probability = 0.5 }}
"path.version" = {{ dictionary = "versions", probability = 0.5 }}
"path.prompt_id" = {{ dictionary = "prompts", probability = 0.5 }}
"""


def demo_prompt(seed: int = 0) -> bytes:
    """An untrained but valid prompt artifact for the default model."""
    torch.manual_seed(seed)
    program = build_program(ProgramSpec(kind="expand", frame_size=(32, 32), inner_size=16,
                                        resolution=8))
    labelmap = build_labelmap(LabelMapSpec(kind="linear", num_source=10, num_target=10))
    prompt = Prompt.from_reprogrammer(Reprogrammer(program, labelmap),
                                      target_classes=tuple(str(i) for i in range(10)),
                                      source=dict(load_model().meta.fingerprint()), seed=seed,
                                      metrics={})
    return dump_prompt(prompt)


def schemathesis_command(url: str, config: Path, max_examples: int, seed: int,
                         workers: int) -> list[str]:
    """The ``schemathesis run`` command line."""
    exe = Path(sys.executable).parent / "schemathesis"
    head = [str(exe)] if exe.exists() else [sys.executable, "-m", "schemathesis.cli"]
    return [*head, "--config-file", str(config), "run", f"{url}/openapi.json",
            "--checks", ",".join(CHECKS), "--max-examples", str(max_examples),
            "--seed", str(seed), "--workers", str(workers), "--request-timeout", "30",
            "--suppress-health-check", "all", "--no-color"]


def run(max_examples: int, seed: int, workers: int, timeout: float) -> tuple[int, str]:
    """Start the server, fuzz it, stop it; returns (schemathesis status, its output)."""
    data = demo_prompt()
    from server.prompt_store import prompt_id

    pid = prompt_id(data)
    with tempfile.TemporaryDirectory(prefix="reprogram-fuzz-") as tmp:
        folder = Path(tmp) / "prompts"
        folder.mkdir()
        (folder / f"{pid}.safetensors").write_bytes(data)  # no owners file: public
        config = Path(tmp) / "schemathesis.toml"
        config.write_text(CONFIG.format(pid=pid, key=FUZZ_KEY))
        env = {**os.environ, "REPROGRAM_API_KEYS": f"fuzz:{FUZZ_KEY}"}
        args = ["--prompts-dir", str(folder), "--no-access-log", "--max-images", "64",
                "--fit-workers", "1", "--jobs-dir", str(Path(tmp) / "jobs"),
                "--fit-quota", "20000"]
        with server_process(args, env=env) as url:
            cmd = schemathesis_command(url, config, max_examples, seed, workers)
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  cwd=tmp, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def summary_of(output: str) -> str:
    """Schemathesis' FAILURES section (if any) and SUMMARY, without the progress lines."""
    for marker in (" FAILURES ", " SUMMARY "):
        at = output.find(marker)
        if at >= 0:
            return output[output.rfind("\n", 0, at) + 1:].rstrip()
    return output[-6000:].rstrip()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n")[0])
    p.add_argument("--max-examples", type=int, default=100,
                   help="test cases per operation and phase (the suite uses 6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole run")
    p.add_argument("--print-command", action="store_true",
                   help="print the schemathesis.toml and command for a server at $URL, exit")
    args = p.parse_args(argv)
    if args.max_examples < 1 or args.workers < 1:
        p.error("expected --max-examples >= 1 and --workers >= 1")
    if args.print_command:
        cmd = schemathesis_command("$URL", Path("schemathesis.toml"), args.max_examples,
                                   args.seed, args.workers)
        print("# schemathesis.toml (PROMPT_ID: a hosted prompt, KEY: an API key of the server):")
        print(CONFIG.format(pid="PROMPT_ID", key="KEY"))
        print(" ".join(f"'{c}'" if " " in c else c for c in cmd))
        return 0
    start = time.perf_counter()
    status, output = run(args.max_examples, args.seed, args.workers, args.timeout)
    print(summary_of(output))
    print(f"schemathesis exit status {status}; {time.perf_counter() - start:.0f} s in all")
    return status


if __name__ == "__main__":
    sys.exit(main())
