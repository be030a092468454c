"""The README's examples are code that runs: every ```python block, in order, in one
namespace (later blocks use what earlier ones define), and its test command is .ci/run's."""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_python_blocks_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) >= 4, "the README's python examples went missing"
    namespace: dict[str, object] = {}
    torch.manual_seed(0)
    for i, block in enumerate(blocks):
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # an example that warns is a bad example
            try:
                exec(compile(block, f"README.md python block {i}", "exec"), namespace)
            except Exception as e:
                raise AssertionError(f"README python block {i} fails: {type(e).__name__}: {e}\n{block}") from e


def test_test_command_is_the_ci_command() -> None:
    readme_commands = re.findall(r"```bash\n(.*?)```", README, re.S)
    test_command = next(c.strip() for c in readme_commands if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text()
    # .ci/run installs the pinned torch on its own line, then runs the rest of the command.
    assert test_command.startswith("pip install torch==2.13.0 && ")
    rest = test_command.removeprefix("pip install torch==2.13.0 && ").replace(
        "pip install", "python -m pip install --quiet"
    )
    assert rest in ci, f"README test command {test_command!r} is not what .ci/run runs"
    assert 'python -m pip install --quiet "torch==2.13.0"' in ci
