"""Run configs (TOML) on the embedded demo model and data, for tests that train through the CLI's runner.

Holds no tests itself.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

# The demo base in fp32 and its dataset at one 32 x 32 bucket: the smallest real run.
DEMO_MODEL_AND_DATA = """
[model]
checkpoint = "embedded-demo"
dtype = "fp32"

[data]
folder = "embedded-demo"
resolution = 32
bucket_step = 4
min_side = 32
max_side = 32
"""


def write_demo_config(folder: Path, tables: str, data: str = "") -> Path:
    """`folder`/run.toml: the demo model and data (plus `data` lines in [data]) and the other `tables`."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "run.toml"
    config.write_text(DEMO_MODEL_AND_DATA + textwrap.dedent(data) + textwrap.dedent(tables), encoding="utf-8")
    return config
