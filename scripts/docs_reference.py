"""Write the generated parts of docs/reference/ from the code's own text, or check them (--check).

Each generated part sits between `<!-- BEGIN GENERATED: <name> -->` and `<!-- END GENERATED -->`
in a file of docs/reference/; everything outside the markers is written by hand. The sources:
the Makefile's `## ` help texts and the `## ` line above each `?=` variable, the usage text of
each script a target runs, and the Description, Default and AlarmDescription of every Parameter,
Output, alarm and EventBridge rule in cloudformation/*.yaml. `make docs` writes them; with
--check (tests/test_docs.py) it prints the difference and exits 1 when a part is stale.
"""

import difflib
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
MAKEFILE = ROOT / "Makefile"
TEMPLATES = ROOT / "cloudformation"
REFERENCE = ROOT / "docs" / "reference"
BLOCK = re.compile(
    r"(<!-- BEGIN GENERATED: (?P<name>[a-z-]+) -->\n)(?P<body>.*?)(<!-- END GENERATED -->)", re.S
)
TARGET = re.compile(r"^(?P<name>[a-zA-Z_-]+):[^=]*?## (?P<help>.*)$")
VARIABLE = re.compile(r"^(?P<name>[A-Z][A-Z0-9_]*) \?=[ \t]*(?P<default>.*)$")
USAGE = re.compile(r"<<-?'?USAGE'?\n(?P<text>.*?)\nUSAGE\n", re.S)
STACKS = ("base", "data", "ci-access", "service")


class Loader(yaml.SafeLoader):
    """YAML with CloudFormation's short tags (!Ref, !Sub, ...) read as plain values."""


def _tag(loader, suffix, node):
    """Read a CloudFormation tag as the value it wraps."""
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_scalar(node)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node)
    return loader.construct_mapping(node)


Loader.add_multi_constructor("!", _tag)


def cell(text):
    """Make text safe for one Markdown table cell (GitHub would drop <SHA> as an HTML tag)."""
    text = " ".join(str(text).split())
    return text.replace("|", "\\|").replace("<", "&lt;").replace("*", "\\*")


def table(header, rows):
    """Render a Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def make_targets(text=None):
    """Every documented target of the Makefile as (section, name, help), in file order."""
    section, found = "", []
    for line in (text if text is not None else MAKEFILE.read_text()).splitlines():
        if line.startswith("##@ "):
            section = line[4:].strip()
        elif match := TARGET.match(line):
            found.append((section, match["name"], match["help"].strip()))
    return found


def make_variables(text=None):
    """Every `NAME ?= default` of the Makefile as (name, default, the `## ` line above it)."""
    found, above = [], ""
    for line in (text if text is not None else MAKEFILE.read_text()).splitlines():
        if match := VARIABLE.match(line):
            found.append((match["name"], match["default"].strip(), above))
        above = line[3:].strip() if line.startswith("## ") else ""
    return found


def target_scripts(text=None):
    """Map each target to the scripts/*.sh its recipe runs."""
    scripts, current = {}, None
    for line in (text if text is not None else MAKEFILE.read_text()).splitlines():
        if match := TARGET.match(line):
            current = match["name"]
        elif line.startswith("\t") and current:
            for script in re.findall(r"scripts/[\w-]+\.sh", line):
                scripts.setdefault(current, []).append(script)
        elif line and not line.startswith(("\t", "#", ".PHONY")) and ":" in line:
            current = line.split(":")[0] if not line.startswith(" ") else current
    return scripts


def templates():
    """Each template of cloudformation/, parsed, by stack name (base, data, ci-access, service)."""
    found = {}
    for path in TEMPLATES.glob("*.yaml"):
        loader = Loader(path.read_text())  # a SafeLoader that also reads !Ref, !Sub, ...
        try:
            found[path.stem] = loader.get_single_data()
        finally:
            loader.dispose()
    order = {stack: index for index, stack in enumerate(STACKS)}
    return dict(sorted(found.items(), key=lambda item: (order.get(item[0], len(order)), item[0])))


def alarms(parsed=None):
    """Every CloudWatch alarm and EventBridge rule as (stack, logical id, type, description)."""
    found = []
    for stack, template in (parsed or templates()).items():
        for logical_id, resource in (template.get("Resources") or {}).items():
            props = resource.get("Properties") or {}
            if resource.get("Type") == "AWS::CloudWatch::Alarm":
                found.append(
                    (stack, logical_id, "CloudWatch alarm", props.get("AlarmDescription", ""))
                )
            elif resource.get("Type") == "AWS::Events::Rule":
                found.append((stack, logical_id, "EventBridge rule", props.get("Description", "")))
    return found


def render_make_targets():
    """One table of targets per section of the Makefile, one row per `## ` help text."""
    sections = {}
    for section, name, text in make_targets():
        sections.setdefault(section, []).append((f"`make {name}`", cell(text)))
    parts = [
        f"### {section}\n\n" + table(("Target", "What it does"), rows)
        for section, rows in sections.items()
    ]
    return "\n".join(parts)


def render_make_variables():
    """The variables table: name, default, the `## ` line above it."""
    rows = [
        (f"`{name}`", f"`{cell(default)}`" if default else "(empty)", cell(text))
        for name, default, text in make_variables()
    ]
    return table(("Variable", "Default", "Meaning"), rows)


def render_script_usage():
    """The usage text of each script the targets run, once per script, as the script prints it."""
    targets = {}
    for target, scripts in target_scripts().items():
        for script in scripts:
            targets.setdefault(script, []).append(target)
    parts = []
    for script, names in targets.items():
        match = USAGE.search((ROOT / script).read_text())
        if match:
            shown = ", ".join(f"`make {name}`" for name in dict.fromkeys(names))
            parts.append(f"#### {shown} (`{script}`)\n\n```text\n{match['text']}\n```\n")
    return "\n".join(parts)


def render_stack_parameters():
    """One table of parameters per template: name, default, description."""
    parts = []
    for stack, template in templates().items():
        rows = []
        for name, spec in (template.get("Parameters") or {}).items():
            default = spec.get("Default")
            shown = (
                "(required)" if default is None else f"`{cell(default)}`" if default else "(empty)"
            )
            rows.append((f"`{name}`", shown, cell(spec.get("Description", ""))))
        parts.append(
            f"### {stack} (`cloudformation/{stack}.yaml`)\n\n"
            + table(("Parameter", "Default", "Meaning"), rows)
        )
    return "\n".join(parts)


def render_stack_outputs():
    """One table of outputs per template: name, description."""
    parts = []
    for stack, template in templates().items():
        outputs = template.get("Outputs") or {}
        rows = [(f"`{name}`", cell(spec.get("Description", ""))) for name, spec in outputs.items()]
        if rows:
            parts.append(f"### {stack}\n\n" + table(("Output", "Meaning"), rows))
    return "\n".join(parts)


def render_alarms():
    """The alarms and alarm rules: where they live and their description (first action first)."""
    rows = [
        (f"`{logical_id}`", stack, kind, cell(text)) for stack, logical_id, kind, text in alarms()
    ]
    return table(("Alarm", "Stack", "Kind", "First action, then when it fires"), rows)


RENDER = {
    "make-targets": render_make_targets,
    "make-variables": render_make_variables,
    "script-usage": render_script_usage,
    "stack-parameters": render_stack_parameters,
    "stack-outputs": render_stack_outputs,
    "alarms": render_alarms,
}


def regenerate(text):
    """Return text with every generated part written anew (an unknown name is an error)."""

    def fill(match):
        name = match["name"]
        if name not in RENDER:
            raise SystemExit(f"error: unknown generated part '{name}' (known: {', '.join(RENDER)})")
        return f"{match.group(1)}\n{RENDER[name]()}\n{match.group(4)}"

    return BLOCK.sub(fill, text)


def main(argv):
    """Write the generated parts, or with --check print what would change and exit 1."""
    if argv not in ([], ["--check"]):
        print("usage: scripts/docs_reference.py [--check]   (or: make docs)", file=sys.stderr)
        return 2
    stale = 0
    for path in sorted(REFERENCE.glob("*.md")):
        old = path.read_text()
        new = regenerate(old)
        if new == old:
            continue
        if argv:
            stale += 1
            name = str(path.relative_to(ROOT))
            sys.stdout.writelines(
                difflib.unified_diff(old.splitlines(True), new.splitlines(True), name, name)
            )
        else:
            path.write_text(new)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(f"\n{stale} file(s) of docs/reference/ are stale: run make docs")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
