"""The documentation stays true: every command the README and docs/ give parses with flags that exist,
every file they link exists, and the flag tables of docs/scripts.md are what the config dataclasses
say. Nothing is run: parsing is enough to catch a renamed flag or a moved file.

UPDATE_DOCS=1 python -m pytest tests/test_docs.py rewrites the generated flag tables.
"""
import importlib
import os
import re
import shlex
from pathlib import Path

import pytest

import runtime
from data import split_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CONFIGS = {"train.py": "train.TrainConfig", "evaluate.py": "evaluate.EvalConfig", "explain.py": "explain.ExplainConfig"}
FLAGS = re.compile(r"<!-- flags: (\w+)\.(\w+) -->\n.*?<!-- end flags -->\n", re.S)


def config_class(dotted: str):
    module, name = dotted.split(".")
    return getattr(importlib.import_module(module), name)


def with_flag_tables(text: str) -> str:
    """The text with each <!-- flags: module.Config --> region regenerated (runtime.flag_table)."""
    return FLAGS.sub(lambda m: f"<!-- flags: {m[1]}.{m[2]} -->\n{runtime.flag_table(config_class(f'{m[1]}.{m[2]}'))}"
                               "<!-- end flags -->\n", text)


def commands(path: Path) -> list[tuple[str, list[str]]]:
    """(script, arguments) of every `python SCRIPT.py ...` or `torchrun ... SCRIPT.py ...` line in the
    file's bash code blocks, comments and line continuations removed."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        lines = block.replace("\\\n", " ").splitlines()
        for i, line in enumerate(lines):
            if not line.startswith(("python ", "torchrun ")):
                continue
            for j in range(i + 1, len(lines) + 1):  # a quoted argument may run over lines
                try:
                    words = shlex.split(" ".join(lines[i:j]), comments=True)
                    break
                except ValueError:
                    continue
            scripts = [k for k, w in enumerate(words) if w.endswith(".py")]
            if scripts:
                found.append((words[scripts[0]], words[scripts[0] + 1:]))
    return found


ALL_COMMANDS = [(p.name, script, args) for p in DOCS for script, args in commands(p)]


def test_the_readme_is_a_front_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 260, f"README.md has {len(lines)} lines; move detail to docs/"
    assert ALL_COMMANDS and any(s == "train.py" for f, s, _ in ALL_COMMANDS if f == "README.md")


@pytest.mark.parametrize("doc, script, args", ALL_COMMANDS,
                         ids=[f"{d}:{s} {' '.join(a)}"[:90] for d, s, a in ALL_COMMANDS])
def test_every_documented_command_parses(doc, script, args):
    """Each flag exists (abbreviations are not accepted), each value passes the config's own
    checks; placeholders such as RUN/best.pt are fine, nothing is opened."""
    name = Path(script).name
    if name in CONFIGS:
        cls = config_class(CONFIGS[name])
        parser = runtime._parser(cls, None, suppress=False)
        try:
            cfg = cls(**vars(parser.parse_args(args)))
        except SystemExit:
            pytest.fail(f"{doc}: `{script} {' '.join(args)}` does not parse (a flag that does not exist?)")
        problem = runtime.out_of_range(cfg) or cfg.check() if hasattr(cfg, "check") else runtime.out_of_range(cfg)
        assert problem is None, f"{doc}: `{script} {' '.join(args)}`: {problem}"
    elif name == "data.py":
        split_parser().parse_args(args)
    else:
        assert (REPO / script).is_file(), f"{doc} runs {script}, which does not exist"


@pytest.mark.parametrize("doc", DOCS, ids=[p.name for p in DOCS])
def test_every_linked_file_exists(doc):
    text = doc.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    missing = [link for link in links if not re.match(r"(https?:|mailto:|#)", link)
               and not (doc.parent / link.split("#")[0]).exists()]
    assert not missing, f"{doc.name} links to files that do not exist: {missing}"


def test_the_flag_tables_are_generated_from_the_configs():
    path = REPO / "docs" / "scripts.md"
    text = path.read_text()
    assert len(FLAGS.findall(text)) == len(CONFIGS)
    fresh = with_flag_tables(text)
    if fresh != text and os.environ.get("UPDATE_DOCS"):
        path.write_text(fresh)
        return
    assert fresh == text, "docs/scripts.md's flag tables are stale: UPDATE_DOCS=1 python -m pytest tests/test_docs.py"


def test_a_stale_table_or_a_bad_flag_is_caught():
    """The checks above can fail: a table with a flag removed differs, and an unknown flag, an
    abbreviation or a README-style `--monitor acc|auc` do not parse."""
    text = "<!-- flags: train.TrainConfig -->\n| x |\n<!-- end flags -->\n"
    assert with_flag_tables(text) != text
    parser = runtime._parser(config_class("train.TrainConfig"), None, suppress=False)
    for bad in (["--no-such-flag", "1"], ["--epoch", "3"], ["--monitor", "acc|auc"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_the_first_run_benchmark_runs_the_readme_s_commands_as_written():
    """bench/first_run.sh times the README's first run: each of its python commands is one the
    README gives, word for word (it once left out step 2's --audit)."""
    script = (REPO / "bench" / "first_run.sh").read_text().replace("\\\n", " ")
    timed = [shlex.split(line, comments=True)[1:] for line in script.splitlines() if line.startswith("step python ")]
    readme = [[script, *args] for script, args in commands(REPO / "README.md")]
    assert len(timed) >= 7 and all(t[1:] in readme for t in timed), [t for t in timed if t[1:] not in readme]
