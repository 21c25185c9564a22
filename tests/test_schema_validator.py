"""The OpenAPI text schema and clean_text accept exactly the same strings (ECMA-262 semantics).

JSON Schema patterns are ECMA-262 regular expressions and minLength/maxLength count code points.
Node evaluates the document's own schema, with and without the "u" flag, on generated strings,
and so does the Rust validator schemathesis uses; cars.clean_text judges the same strings; the
verdicts must be equal. Strings with lone surrogates are not Unicode text, which is all a JSON
Schema string can be: the API refuses every one of them.
"""

import json
import random
import shutil
import subprocess

import jsonschema_rs
import pytest

import cars

NODE = shutil.which("node")
JUDGE = r"""
const {schema, strings} = JSON.parse(require("fs").readFileSync(0, "utf8"));
const verdicts = {};
for (const flags of ["u", ""]) {
  const re = new RegExp(schema.pattern, flags);
  verdicts[flags || "none"] = strings.map((s) => {
    const length = [...s].length;  // code points, as JSON Schema counts them
    return length >= schema.minLength && length <= schema.maxLength && re.test(s);
  });
}
process.stdout.write(JSON.stringify(verdicts));
"""
# Characters at every edge of the shared ranges, plus the known troublemakers.
ALPHABET = [
    "a",
    "Z",
    " ",
    "\t",
    "\n",
    "\x0b",
    "\x0c",
    "\r",
    "\x1c",
    "\x1f",
    "\x00",
    "\x7f",
    "\x80",
    "\x85",
    "\x9f",
    "\xa0",
    "\xa1",
    "\u1680",
    "\u180e",
    "\u2000",
    "\u200a",
    "\u200b",
    "\u2028",
    "\u2029",
    "\u202f",
    "\u205f",
    "\u3000",
    "\ufeff",
    "\ufffe",
    "\uffff",
    "\ud800",
    "\udbff",
    "\udc00",
    "\udfff",
    "\U0001f697",
    "\U0010ffff",
    "Š",
    '"',
    "\\",
]
KNOWN = [
    "\x1fFord",
    "\x85",
    "\U0001f697" * 33,
    "\U0001f697" * 64,
    "\U0001f697" * 65,
    " " * 10 + "x" * 54,
    " " * 10 + "x" * 55,
    "Ford ",
    "x" * 64,
    "x" * 65,
    "",
    " ",
    "\ud83d\ude97",  # two surrogates that JSON joins into one character
    "a\ud800b",
]


def generated(count=3000, seed=9):
    """Return the known cases plus random strings over ALPHABET of length 0 to 70."""
    rng = random.Random(seed)
    strings = list(KNOWN)
    for _ in range(count):
        length = rng.choice([1, 2, 3, 5, 8, 63, 64, 65, rng.randint(0, 70)])
        strings.append("".join(rng.choice(ALPHABET) for _ in range(length)))
    return strings


def has_lone_surrogate(text):
    """Tell whether a string holds a surrogate code point (never part of Unicode text)."""
    return any(0xD800 <= ord(ch) <= 0xDFFF for ch in text)


def text_schema():
    """Return the schema of brand from the served OpenAPI document."""
    doc = json.loads(json.dumps(cars.openapi()))  # what a client reads
    return doc["components"]["schemas"]["CarInput"]["properties"]["brand"]


@pytest.mark.skipif(NODE is None, reason="needs node for ECMA-262 regular expressions")
def test_schema_and_validator_agree_on_every_generated_string():
    # As the API receives them: JSON joins a high and a low surrogate escape into one character.
    received = [json.loads(json.dumps(s)) for s in generated()]
    strings = [s for s in received if not has_lone_surrogate(s)]
    broken = [s for s in received if has_lone_surrogate(s)]
    assert len(broken) > 50
    assert not [s for s in broken if cars.clean_text(s)[1] is None]
    schema = text_schema()
    payload = json.dumps({"schema": schema, "strings": strings})  # lone surrogates as \\uXXXX
    out = subprocess.run(
        [NODE, "-e", JUDGE], input=payload, capture_output=True, text=True, check=True, timeout=60
    )
    verdicts = json.loads(out.stdout)
    rust = jsonschema_rs.Draft202012Validator(schema)
    verdicts["rust"] = [rust.is_valid(s) for s in strings]
    api = [cars.clean_text(s)[1] is None for s in strings]
    for flags, schema_says in verdicts.items():
        differ = [(s, a) for s, a, b in zip(strings, api, schema_says, strict=True) if a != b]
        assert not differ, f"flags={flags}: API and schema disagree on {differ[:5]}"
    assert 100 < sum(api) < len(strings) - 100  # both verdicts are well represented


def test_query_filters_and_body_fields_share_one_text_schema():
    doc = cars.openapi()
    body = doc["components"]["schemas"]["CarInput"]["properties"]
    query = {p["name"]: p["schema"] for p in doc["paths"]["/cars"]["get"]["parameters"]}
    assert body["brand"] == body["model"] == query["brand"] == query["model"]
    assert body["brand"]["maxLength"] == cars.TEXT_MAX
