"""The docs cannot drift from the code.

Contract (docs/reference/make.md, README "Documentation"): every make target and variable, every
environment setting cars.py reads, every stack parameter and output, every alarm is in the
reference docs, and nothing is there that the code lacks; the generated tables are what
`make docs` writes now; every relative link, anchor and repository path the docs name exists; no
doc points outside the repository; every `make` command in the docs names real targets and
settings something reads; tables and Mermaid blocks are well formed.
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import docs_reference  # noqa: E402  # the generator is a script, not a package

DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
FENCE = re.compile(r"^```[^\n]*\n.*?^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
TOP_LEVEL = {
    path.split("/")[0]
    for path in subprocess.check_output(["git", "ls-files"], cwd=ROOT, text=True).split()
}
TOP_LEVEL |= {"docs"}
# Settings that tests and the bench read (docs/reference/make.md lists them).
TEST_SETTINGS = {"CI", "SOAK_SECONDS", "BENCH_DURATION", "BENCH_ROUNDS"}


def text_of(path):
    return path.read_text(encoding="utf-8")


def name_of(path):
    return str(path.relative_to(ROOT))


def code_spans(text):
    """Every inline code span and every line of every fenced block."""
    spans = INLINE.findall(FENCE.sub("", text))
    for block in FENCE.findall(text):
        spans += block.splitlines()[1:-1]
    return spans


def settings_cars_py_reads():
    """The environment names cars.py reads: environ.get, env_number, env_switch, api_token,
    and f"{kind}_USER"-style names over the keys of the dict the comprehension walks."""
    tree = ast.parse((ROOT / "cars.py").read_text())
    dicts = {
        node.targets[0].id: [key.value for key in node.value.keys if isinstance(key, ast.Constant)]
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Dict)
        and isinstance(node.targets[0], ast.Name)
    }
    names = set()
    for node in ast.walk(tree):
        for comprehension in getattr(node, "generators", []):
            loop = comprehension.target.id if isinstance(comprehension.target, ast.Name) else None
            keys = dicts.get(getattr(comprehension.iter, "id", None), [])
            for call in ast.walk(node):
                name = env_name_of(call)
                if isinstance(name, ast.JoinedStr) and loop:
                    names |= {joined(name, loop, key) for key in keys}
        name = env_name_of(node)
        if isinstance(name, str):
            names.add(name)
    return {name for name in names if name and re.fullmatch(r"[A-Z][A-Z0-9_]*", name)}


def env_name_of(node):
    """The name argument of an environment read, as a string or an f-string node; else None."""
    if not isinstance(node, ast.Call):
        return None
    func = node.func
    if isinstance(func, ast.Name) and func.id in ("env_number", "env_switch", "api_token"):
        argument = node.args[1] if len(node.args) > 1 else None
    elif (
        isinstance(func, ast.Attribute)
        and func.attr in ("get", "getenv")
        and ast.unparse(func.value) in ("environ", "os.environ", "os")
    ):
        argument = node.args[0] if node.args else None
    else:
        return None
    if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
        return argument.value
    return argument if isinstance(argument, ast.JoinedStr) else None


def joined(node, loop, key):
    """Evaluate f"{loop}_SUFFIX" for one key; None when it holds anything else."""
    parts = []
    for value in node.values:
        if isinstance(value, ast.Constant):
            parts.append(value.value)
        elif isinstance(value, ast.FormattedValue) and ast.unparse(value.value) == loop:
            parts.append(key)
        else:
            return None
    return "".join(parts)


def first_column(path, heading):
    """The code names in the first column of the tables under a heading of a doc."""
    text = "\n" + text_of(path)
    start = text.index(f"\n{heading}\n")
    level = heading.split()[0]
    end = text.find(f"\n{level} ", start + 1)
    section = text[start : end if end > 0 else None]
    names = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            names |= set(re.findall(r"`([A-Z][A-Z0-9_]*)`", line.split("|")[1]))
    return names


def anchors(path):
    """GitHub's anchors of a Markdown file's headings."""
    found = set()
    for line in FENCE.sub("", text_of(path)).splitlines():
        if match := re.match(r"#{1,6} (.*)", line):
            slug = re.sub(r"[^\w\- ]", "", match[1].strip().lower()).replace(" ", "-")
            found.add(slug)
    return found


def make_targets():
    return {name for _, name, _ in docs_reference.make_targets()}


def known_variables():
    """Everything a `NAME=value` on a make command line may set: what the Makefile, the
    scripts, cars.py or the tests read."""
    code = "\n".join(
        text_of(path)
        for pattern in (
            "Makefile",
            "scripts/*.sh",
            "scripts/*.py",
            "cars.py",
            "docker-compose.yaml",
        )
        for path in ROOT.glob(pattern)
    )
    return set(re.findall(r"\b[A-Z][A-Z0-9_]{1,}\b", code)) | TEST_SETTINGS


# ------------------------------------------------------------------ generated and checked tables


def test_generated_reference_tables_are_what_make_docs_writes():
    done = subprocess.run(
        [sys.executable, "scripts/docs_reference.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, f"the generated reference is stale:\n{done.stdout}{done.stderr}"


def test_every_make_variable_has_a_one_line_description():
    missing = [name for name, _, text in docs_reference.make_variables() if not text]
    assert not missing, (
        f"add a '## <what it is>' line above each of {missing} in the Makefile, then make docs"
    )


def test_every_make_target_and_variable_is_in_the_make_reference_and_nothing_else():
    reference = text_of(ROOT / "docs/reference/make.md")
    listed = set(re.findall(r"^\| `make ([a-z-]+)` \|", reference, re.M))
    assert listed == make_targets(), "run make docs"
    variables = {name for name, _, _ in docs_reference.make_variables()}
    assert first_column(ROOT / "docs/reference/make.md", "## Variables") == variables, (
        "run make docs"
    )


def test_settings_reference_lists_exactly_the_environment_cars_py_reads():
    read = settings_cars_py_reads()
    assert {"API_TOKEN", "MYSQL_HOST", "APP_USER", "MIGRATION_PASSWORD"} <= read  # the parser works
    documented = first_column(ROOT / "docs/reference/settings.md", "# Reference: settings")
    assert not read - documented, (
        f"cars.py reads {sorted(read - documented)}: add them to docs/reference/settings.md"
    )
    assert not documented - read, (
        f"docs/reference/settings.md lists {sorted(documented - read)}, which cars.py never reads"
    )


def test_every_stack_parameter_output_and_alarm_is_in_the_reference():
    stacks = text_of(ROOT / "docs/reference/stacks.md")
    alarms = text_of(ROOT / "docs/reference/alarms.md")
    for stack, template in docs_reference.templates().items():
        for name in list(template.get("Parameters") or {}) + list(template.get("Outputs") or {}):
            assert f"| `{name}` |" in stacks, (
                f"{stack} {name} is missing from docs/reference/stacks.md: run make docs"
            )
    found = docs_reference.alarms()
    assert found, "no alarms found in cloudformation/*.yaml"
    for stack, logical_id, _, _ in found:
        assert f"| `{logical_id}` | {stack} |" in alarms, f"{logical_id} is missing: run make docs"


def test_alarm_and_parameter_names_in_the_prose_exist_in_the_templates():
    parsed = docs_reference.templates()
    parameters = {name for template in parsed.values() for name in template.get("Parameters") or {}}
    resources = {name for template in parsed.values() for name in template.get("Resources") or {}}
    outputs = {name for template in parsed.values() for name in template.get("Outputs") or {}}
    for path in DOCS:
        for span in code_spans(text_of(path)):
            for alarm in re.findall(r"\b([A-Z][A-Za-z]+Alarm)\b", span):
                assert alarm in resources, (
                    f"{name_of(path)} names `{alarm}`, which no template defines"
                )
            if match := re.fullmatch(r"([A-Z][a-z]+[A-Z][A-Za-z]+)=\S*", span.strip()):
                assert match[1] in parameters | outputs, (
                    f"{name_of(path)} names parameter `{match[1]}`, which no template has"
                )


# ------------------------------------------------------------------ links and paths


@pytest.mark.parametrize("path", DOCS, ids=name_of)
def test_relative_links_and_their_anchors_resolve(path):
    for target in LINK.findall(FENCE.sub("", text_of(path))):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        assert resolved.is_relative_to(ROOT), (
            f"{name_of(path)} links outside the repository: {target}"
        )
        assert resolved.exists(), f"{name_of(path)} links to {target}, which does not exist"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), (
                f"{name_of(path)} links to {target}: no such heading"
            )


@pytest.mark.parametrize("path", DOCS, ids=name_of)
def test_repository_paths_named_in_the_docs_exist(path):
    for span in INLINE.findall(FENCE.sub("", text_of(path))):
        token = span.strip().rstrip(".,:")
        if " " in token or "<" in token or "://" in token:
            continue
        if token.split("/")[0] in TOP_LEVEL and token not in ("tests", "docs"):
            assert list(ROOT.glob(token)) or (ROOT / token).exists(), (
                f"{name_of(path)} names `{token}`, which does not exist"
            )
        elif re.fullmatch(r"[\w.-]+\.(py|sh|yaml|yml|md|in|txt)", token):
            assert list(ROOT.rglob(token)), (
                f"{name_of(path)} names `{token}`, which no file of the repository is"
            )


@pytest.mark.parametrize("path", DOCS, ids=name_of)
def test_docs_never_point_outside_the_repository(path):
    text = text_of(path)
    linked = set(LINK.findall(FENCE.sub("", text)))
    for match in re.finditer(r"(?:\.\./)+[\w.-]*", text):
        start = text.rfind("(", 0, match.start())
        target = text[start + 1 : text.find(")", match.start())] if start >= 0 else ""
        base = path.parent if target in linked else ROOT
        assert (base / match[0]).resolve().is_relative_to(ROOT), (
            f"{name_of(path)} points outside the repository: {match[0]}"
        )


# ------------------------------------------------------------------ commands


def test_make_commands_in_the_docs_name_real_targets_and_settings():
    targets, variables = make_targets(), known_variables()
    for path in DOCS:
        for span in code_spans(text_of(path)):
            for command in re.findall(r"(?:^|[;&|(]\s*|\s)make ([^#`;&|)]*)", span):
                words = command.split()
                if not words or not re.fullmatch(r"[a-z][a-z-]*", words[0]):
                    continue
                assert words[0] in targets, (
                    f"{name_of(path)}: `make {command.strip()}`: no target {words[0]}"
                )
                for word in words[1:]:
                    if match := re.fullmatch(r"([A-Z][A-Z0-9_]*)=.*", word):
                        assert match[1] in variables, (
                            f"{name_of(path)}: `make {command.strip()}`: nothing reads {match[1]}"
                        )


def walk_through(text):
    """The commands of the first console block and the output printed under each."""
    block = re.search(r"^```console\n(.*?)^```", text, re.S | re.M)[1]
    steps = []
    for line in block.splitlines():
        if line.startswith("$ "):
            steps.append([line[2:], []])
        elif steps and steps[-1][0].endswith("\\"):
            steps[-1][0] = steps[-1][0][:-1] + " " + line.strip()
        elif steps:
            steps[-1][1].append(line)
    return steps


def test_the_readme_walk_through_answers_exactly_as_printed(run_server):
    server = run_server()
    steps = walk_through(text_of(ROOT / "README.md"))
    assert len(steps) >= 3, steps
    for command, printed in steps:
        assert command.startswith("curl "), command
        assert "http://127.0.0.1:8080/" in command, command
        live = command.replace("http://127.0.0.1:8080", server.url)
        done = subprocess.run(
            ["bash", "-c", f"{live} --silent --show-error"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "\n".join(printed).strip(), f"README: $ {command}"


# ------------------------------------------------------------------ rendering basics


@pytest.mark.parametrize("path", DOCS, ids=name_of)
def test_tables_have_as_many_cells_in_each_row_as_in_the_header(path):
    def cells(row):
        row = re.sub(r"`[^`]*`", "code", row.replace("\\|", ""))
        return row.strip().strip("|").count("|") + 1

    table = []
    for line in [*FENCE.sub("", text_of(path)).splitlines(), ""]:
        if line.startswith("|"):
            table.append(line)
            continue
        if table:
            separator = table[1].replace(" ", "") if len(table) > 1 else ""
            assert re.fullmatch(r"\|(:?-+:?\|)+", separator), (
                f"{name_of(path)}: a table without a separator row: {table[0]}"
            )
            widths = {cells(row) for row in table}
            assert len(widths) == 1, (
                f"{name_of(path)}: rows of different widths in the table {table[0]}"
            )
            table = []


@pytest.mark.parametrize("path", DOCS, ids=name_of)
def test_mermaid_blocks_name_a_diagram_and_close_every_subgraph(path):
    for block in re.findall(r"^```mermaid\n(.*?)^```", text_of(path), re.S | re.M):
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        assert re.match(r"(flowchart|graph|sequenceDiagram)\b", lines[0]), (
            f"{name_of(path)}: {lines[0]}"
        )
        opened = sum(line.startswith("subgraph ") for line in lines)
        assert opened == lines.count("end"), f"{name_of(path)}: a subgraph without its end"


def test_readme_is_a_front_door_of_at_most_250_lines_with_a_map_of_the_docs():
    readme = text_of(ROOT / "README.md")
    assert 150 <= len(readme.splitlines()) <= 250
    for doc in (ROOT / "docs").rglob("*.md"):
        assert f"({name_of(doc)})" in readme, f"README.md does not link {name_of(doc)}"


def test_the_cars_part_of_cars_py_is_one_run_of_the_banners_the_guide_names():
    banners = [
        line for line in (ROOT / "cars.py").read_text().splitlines() if line.startswith("# -- ")
    ]
    guide = text_of(ROOT / "docs/how-to/adapt-for-your-own-service.md")
    named = re.findall(r"`(# -- (?:The cars resource|Service plumbing)[^`]*)`", guide)
    assert len(named) >= 5
    for name in named:
        assert any(banner.startswith(name) for banner in banners), name
    kinds = "".join("c" if b.startswith("# -- The cars resource") else "p" for b in banners)
    assert re.fullmatch(r"p+c+p+", kinds), kinds
