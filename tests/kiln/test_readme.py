"""The README's Python example is executed, so it cannot rot."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks, "README has no python example"
    import kiln

    kiln.executor(base_dir=tmp_path)
    exec(compile(blocks[0], "README.md", "exec"), {})
    assert (tmp_path / "inverted.json").is_file()
    assert (tmp_path / "output" / "readme_00001_.png").is_file()


def test_readme_names_the_ci_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in ci and "make test" in readme
