"""Structured output (serving/structured/): response_format validation, the batched mask, and decoding
under the grammar with the tiny and the embedded model: every output parses and validates."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from serving.structured import JsonSpec, parse_response_format
from serving.structured.closing import JsonPrefix
from serving.structured.grammar import CLOSING_MARGIN, GrammarCompiler
from serving.structured.mask import allocate_bitmask, apply_bitmask
from serving.structured.outputs import StructuredOutputs


def _schema_format(schema: dict, strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": strict}}


def _obj(required: bool = True, **properties) -> dict:
    return {"type": "object", "properties": properties, "additionalProperties": False,
            **({"required": list(properties)} if required else {})}


_INT = {"type": "integer", "minimum": 0, "maximum": 999}
_WORD = {"type": "string", "maxLength": 12}
# Bounded sizes (maxLength, maximum, maxItems) so that even a toy model's output must end
SCHEMAS = {
    "person": _obj(name=_WORD, age={"type": "integer", "minimum": 0, "maximum": 120}),
    "enum": _obj(color={"enum": ["red", "green", "blue"]}, size={"type": "string", "enum": ["S", "M", "L"]}),
    "booleans": _obj(done={"type": "boolean"}, valid={"type": "boolean"}),
    "int_array": {"type": "array", "items": {"type": "integer", "minimum": -50, "maximum": 50},
                  "minItems": 1, "maxItems": 4},
    "nested": _obj(city=_obj(name=_WORD, population=_INT), tags={
        "type": "array", "items": {"enum": ["river", "hill", "sea"]}, "maxItems": 3}),
    "number": _obj(score={"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.25},
                   weight={"type": "number", "minimum": -10, "maximum": 10, "multipleOf": 0.5}),
    "object_array": _obj(items={"type": "array", "items": _obj(id={"type": "integer", "minimum": 0, "maximum": 9},
                                                               label=_WORD), "minItems": 1, "maxItems": 2}),
    "string_limits": _obj(code={"type": "string", "minLength": 3, "maxLength": 5},
                          word={"type": "string", "pattern": "^[a-z]{2,6}$"}),
    "top_enum": {"enum": ["yes", "no", 7, None]},
    "nullable": _obj(value={"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "null"}]}),
    "refs": {"$defs": {"point": _obj(x={"type": "integer", "minimum": 0, "maximum": 9},
                                     y={"type": "integer", "minimum": 0, "maximum": 9})},
             **_obj(kind={"const": "line"}, start={"$ref": "#/$defs/point"}, end={"$ref": "#/$defs/point"})},
    "optional": _obj(required=False, a={"type": "integer", "minimum": 0, "maximum": 9}, b={"type": "boolean"},
                     c=_WORD),
}
FORMATS = {name: _schema_format(schema) for name, schema in SCHEMAS.items()} | {"json_object": {"type": "json_object"}}
# One prompt for every row, so a batch needs no padding
PROMPT = 'Answer in JSON, like {"name":"Nile","length":6650} or {"ok":true}.'


# ---- response_format validation ------------------------------------------------------------------

def test_text_and_absent_mean_no_constraint():
    assert parse_response_format(None) is None
    assert parse_response_format({"type": "text"}) is None


def test_json_object_and_schema_specs():
    assert parse_response_format({"type": "json_object"}) == JsonSpec('{"type":"object"}', strict=True)
    spec = parse_response_format(_schema_format({"type": "object", "properties": {"b": {}, "a": {}}}, strict=False))
    assert spec.schema == '{"type":"object","properties":{"b":{},"a":{}}}' and not spec.strict  # key order kept
    # equal schemas give equal (hashable) specs, so they share one compiled grammar
    assert parse_response_format(FORMATS["person"]) == parse_response_format(json.loads(json.dumps(FORMATS["person"])))


def test_accepts_what_the_openai_client_sends_for_a_pydantic_model():
    from typing import Literal, Optional

    import pydantic

    parsing = pytest.importorskip("openai.lib._parsing._completions")  # behind client.beta...parse(...)

    class Step(pydantic.BaseModel):
        explanation: str
        output: int

    class Answer(pydantic.BaseModel):
        steps: list[Step]
        kind: Literal["a", "b"]
        note: Optional[str]

    spec = parse_response_format(parsing.type_to_response_format_param(Answer))
    assert spec.strict and '"$ref":"#/$defs/Step"' in spec.schema


@pytest.mark.parametrize("response_format, field", [
    ("json", "response_format:"),
    ({"type": "xml"}, "response_format.type:"),
    ({"type": "json_object", "schema": {}}, "response_format.schema:"),
    ({"type": "json_schema"}, "response_format.json_schema:"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "response_format.json_schema.name:"),
    ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, "response_format.json_schema.name:"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "extra": 1}},
     "response_format.json_schema.extra:"),
    ({"type": "json_schema", "json_schema": {"name": "a", "strict": "yes"}}, "response_format.json_schema.strict:"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": [1]}}, "response_format.json_schema.schema:"),
    (_schema_format({"type": "bogus"}), "response_format.json_schema.schema: Invalid type"),
    (_schema_format({"$ref": "#/$defs/missing"}), "response_format.json_schema.schema:"),
    (_schema_format({"type": "string", "format": "no-such-format"}), "response_format.json_schema.schema:"),
])
def test_bad_response_format_names_the_field(response_format, field):
    with pytest.raises(ValueError) as e:
        parse_response_format(response_format)
    assert str(e.value).startswith(field), str(e.value)


def test_strict_refuses_what_it_cannot_enforce():
    schema = {"type": "object", "dependentRequired": {"a": ["b"]}}
    with pytest.raises(ValueError, match="dependentRequired"):
        parse_response_format(_schema_format(schema, strict=True))
    assert not parse_response_format(_schema_format(schema, strict=False)).strict  # ignored, best effort


# ---- the mask --------------------------------------------------------------------------------------

def test_apply_bitmask_masks_only_the_constrained_rows():
    torch.manual_seed(0)
    logits = torch.randn(4, 70)  # V not a multiple of 32: the last word is partly used
    before = logits.clone()
    bitmask = torch.zeros(2, 3, dtype=torch.int32)
    bitmask[0, 0] = 0b101  # row 1 may say tokens 0 and 2
    bitmask[1, 2] = 1 << 5  # row 3 may say token 69
    apply_bitmask(logits, [1, 3], bitmask)
    assert torch.equal(logits[[0, 2]], before[[0, 2]])
    assert torch.isfinite(logits[1]).nonzero().flatten().tolist() == [0, 2]
    assert torch.isfinite(logits[3]).nonzero().flatten().tolist() == [69]
    assert torch.equal(logits[1, [0, 2]], before[1, [0, 2]])
    everything = before.clone()
    apply_bitmask(everything, [0, 1], torch.cat([bitmask, bitmask]))  # all rows of a two-row batch, in order
    apply_bitmask(everything[2:], [], bitmask)  # no rows: nothing happens
    assert torch.isfinite(everything[0]).nonzero().flatten().tolist() == [0, 2]
    assert torch.equal(everything[2:], before[2:])
    bit31 = torch.tensor([[-(2 ** 31)]], dtype=torch.int32)  # the sign bit is token 31
    row = torch.zeros(1, 32)
    apply_bitmask(row, [0], bit31)
    assert torch.isfinite(row[0]).nonzero().flatten().tolist() == [31]


@pytest.fixture(scope="module")
def embedded():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serving.models import EMBEDDED_TARGET

    return (AutoTokenizer.from_pretrained(EMBEDDED_TARGET),
            AutoModelForCausalLM.from_pretrained(EMBEDDED_TARGET, dtype=torch.float32).eval())


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model), AutoModelForCausalLM.from_pretrained(tiny_model).eval()


def _compiler(tokenizer, model) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, model.config.vocab_size, [model.config.eos_token_id])


def test_matcher_allows_eos_only_where_the_document_may_end(embedded):
    tokenizer, model = embedded
    eos = model.config.eos_token_id
    matcher = _compiler(*embedded).matcher(parse_response_format(_schema_format({"type": "integer"})))
    bitmask = allocate_bitmask(1, model.config.vocab_size)

    def allowed() -> set[int]:
        matcher.fill_mask(bitmask, 0)
        row = torch.zeros(1, model.config.vocab_size)
        apply_bitmask(row, [0], bitmask)
        return set(torch.isfinite(row[0]).nonzero().flatten().tolist())

    first = allowed()
    assert eos not in first and all(tokenizer.decode([t]).lstrip("-")[:1].isdigit() or tokenizer.decode([t]) == "-"
                                    for t in first)
    assert matcher.accept(tokenizer.convert_tokens_to_ids("4")) and matcher.can_end()
    assert eos in allowed() and not matcher.is_finished()  # "4" may end or go on ("42")
    matcher.rollback(1)
    assert not matcher.can_end() and eos not in allowed()
    assert not matcher.accept(tokenizer.convert_tokens_to_ids("a")) and matcher.error  # forbidden: broken
    assert matcher.is_finished()


def test_compiler_compiles_each_spec_once(embedded):
    compiler = GrammarCompiler(embedded[0], embedded[1].config.vocab_size, [2], max_cached=2)
    specs = [parse_response_format(FORMATS[name]) for name in ("person", "enum", "booleans")]
    a, b = compiler.matcher(specs[0]), compiler.matcher(specs[0])
    assert a.accept(embedded[0].encode('{"', add_special_tokens=False)[0])
    assert not b.can_end() and b is not a  # copies: one sequence's tokens are not the other's
    for spec in specs:
        compiler.matcher(spec)
    assert list(compiler._compiled) == specs[1:]  # LRU of 2: the oldest went


# ---- closing a document early -----------------------------------------------------------------------

_DOC = '{"a":[1,-2.5e+3,{"b":"x\\u00e9\\n\\"é"}],"c":true,"d":null,"e":{},"f":[],"g":"日本"}'.encode()


def test_closing_completes_every_prefix():
    for end in range(len(_DOC) + 1):
        prefix = JsonPrefix()
        prefix.feed(_DOC[:end])
        closing = prefix.closing()
        if closing is None:  # only inside a multi-byte character
            assert _DOC[end] & 0xC0 == 0x80, _DOC[:end]
            continue
        json.loads(_DOC[:end] + closing.encode())
        assert len(closing) <= 12  # never more than each open level's least


@pytest.mark.parametrize("prefix, closing", [
    ('', '{}'), ('{', '}'), ('{"ke', '":null}'), ('{"k":', 'null}'), ('{"k":[', ']}'), ('{"k":[1,', 'null]}'),
    ('{"k":1,', '"":null}'), ('{"k":-', '0}'), ('{"k":1.5e', '0}'), ('{"k":fa', 'lse}'), ('{"k":"\\', 'n"}'),
    ('{"k":"\\u0', '000"}'), ('12', ''), ('{}', ''), ('{"k"]', None), ('{}}', None),
])
def test_closing_is_the_least_that_ends_each_level(prefix, closing):
    state = JsonPrefix()
    state.feed(prefix.encode())
    assert state.closing() == closing


def test_forced_token_only_near_the_end_and_only_what_the_grammar_accepts(embedded):
    tokenizer, _ = embedded
    compiler = _compiler(*embedded)
    free = compiler.matcher(parse_response_format(FORMATS["json_object"]))
    person = compiler.matcher(parse_response_format(FORMATS["person"]))
    for matcher, text in ((free, '{"ab'), (person, '{"name":"ab')):
        for token in tokenizer.encode(text, add_special_tokens=False):
            assert matcher.accept(token)
    closing = tokenizer.encode('":null}', add_special_tokens=False)
    assert free.forced_token(len(closing) + 2 + CLOSING_MARGIN) is None  # room left: the model chooses
    assert free.forced_token(len(closing) + 1 + CLOSING_MARGIN) == closing[0]
    assert person.forced_token(1) is None  # '"}' misses the required "age": max_tokens cuts it


# ---- decoding under the grammar ---------------------------------------------------------------------

def _decode(tokenizer, model, formats: dict, temperature: float, max_tokens: int,
            parallel: bool = False) -> dict[str, tuple[str, bool, bool]]:
    """Decodes one batch, a row per format plus one free row, the way the engine's step does: the
    model's [S, V] logits, the mask on the constrained rows, sampling, accept; a row ends when its
    document is complete (or at EOS, or max_tokens). Returns each format's (text, ended before
    max_tokens, closed early)."""
    from transformers import DynamicCache

    names = list(formats)
    structured = StructuredOutputs(_compiler(tokenizer, model), parallel)
    for seq_id, name in enumerate(names):
        structured.add(seq_id, parse_response_format(formats[name]))
    eos = model.config.eos_token_id
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                           return_dict=True, return_tensors="pt")["input_ids"]
    num_rows = len(names) + 1  # the last row is unconstrained
    inputs, cache = prompt.repeat(num_rows, 1), DynamicCache()
    generators = [torch.Generator().manual_seed(row) for row in range(num_rows)]
    tokens: list[list[int]] = [[] for _ in names]
    running = list(range(len(names)))  # rows still decoding
    with torch.inference_mode():
        for _ in range(max_tokens):
            logits = model(input_ids=inputs, cache=cache, use_cache=True).logits[:, -1].float()  # [S, V]
            free_row = logits[-1].clone()
            structured.mask(logits, running, running, [max_tokens - len(tokens[r]) for r in running])  # row i: seq i
            assert torch.equal(logits[-1], free_row)  # the unconstrained row is untouched
            if temperature == 0.0:
                sampled = logits.argmax(dim=-1).tolist()
            else:
                probs = (logits / temperature).softmax(dim=-1)
                sampled = [int(torch.multinomial(probs[r], 1, generator=generators[r])) for r in range(num_rows)]
            done = structured.accept(running, [sampled[r] for r in running])
            for row, finished in zip(list(running), done):
                if sampled[row] == eos:
                    running.remove(row)  # EOS: allowed only where the document may end
                    continue
                tokens[row].append(sampled[row])
                if finished:
                    running.remove(row)
            if not running:
                break
            inputs = torch.tensor(sampled)[:, None]  # finished rows keep decoding; their tokens are ignored
    outputs = {name: (tokenizer.decode(tokens[row]), row not in running, structured.closed_early(row))
               for row, name in enumerate(names)}
    structured.release(range(len(names)))
    assert not any(row in structured for row in range(len(names)))
    return outputs


def _check_all_valid(outputs: dict[str, tuple[str, bool, bool]]) -> None:
    for name, (text, ended, _) in outputs.items():
        assert ended, f"{name}: cut by max_tokens: {text!r}"
        value = json.loads(text)
        schema = SCHEMAS.get(name, {"type": "object"})
        jsonschema.validate(value, schema)


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "seeded"])
def test_embedded_model_outputs_parse_and_validate(embedded, temperature):
    outputs = _decode(*embedded, FORMATS, temperature, max_tokens=96)
    _check_all_valid(outputs)
    # the bounded schemas end by themselves; the toy model never ends a free object's key (closed for it)
    assert [name for name, (_, _, closed_early) in outputs.items() if closed_early] == ["json_object"]


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "seeded"])
def test_tiny_model_outputs_parse_and_validate(tiny, temperature):
    outputs = _decode(*tiny, FORMATS, temperature, max_tokens=96)
    _check_all_valid(outputs)
    # llguidance's thread pool computes the same masks as one call per row
    assert _decode(*tiny, FORMATS, temperature, max_tokens=96, parallel=True) == outputs


def test_a_document_is_closed_within_max_tokens(embedded):
    """The toy model never ends a free JSON object by itself: near max_tokens it is closed for it."""
    outputs = _decode(*embedded, {"json_object": FORMATS["json_object"], "person": FORMATS["person"]}, 0.0,
                      max_tokens=24)
    text, ended, closed_early = outputs["json_object"]
    assert ended and closed_early and isinstance(json.loads(text), dict)
    assert len(embedded[0].encode(text, add_special_tokens=False)) <= 24
    _check_all_valid(outputs)  # the person closed early as well (its "age" fitted), and still validates
