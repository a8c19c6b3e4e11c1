"""The README: the quick start runs as written, and the times it quotes agree."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quick_start_runs():
    text = README.read_text()
    section = text.split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README quick start", "exec"), namespace)
    info = namespace["info"]
    assert info.forward_passes == 3 and info.backward_passes == 1
    assert 0.999 <= info.beta <= 1.0


def test_readme_gives_one_make_demo_time():
    """The command list and the results table quote the same measured `make demo` time, and
    docs/results.md quotes it too."""
    times = re.findall(r"make demo[^\n]*?(\d+(?:\.\d+)?) min", README.read_text())
    assert len(times) >= 2 and len(set(times)) == 1, times
    results = (README.parent / "docs" / "results.md").read_text()
    assert f"{times[0]} min" in results.split("## 4.")[1].split("## 5.")[0]
