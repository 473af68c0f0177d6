"""Trace format (load/validate/save) and the seeded synthetic generators."""

import json

import numpy as np
import pytest

import dpgather as dg
from dpgather.core import ForwardMode as M
from dpgather.tools.traces import (
    DEFAULT_SPEC,
    FORMAT,
    GENERATORS,
    ReplicaStep,
    Trace,
    accept_pmf,
    load_trace,
    parse_trace,
    save_trace,
    schema,
    synthetic,
)

HEADER = json.dumps({"format": FORMAT, "dp_size": 2,
                     "spec": {"num_steps": 3, "topk": 1, "num_draft_tokens": 4}})


def _write(tmp_path, lines, name="t.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


def _step(i, *reps):
    return json.dumps({"step": i, "replicas": list(reps)})


# -- generators ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(GENERATORS))
@pytest.mark.parametrize("dp_size", [1, 3, 4])
def test_reproducible_and_valid(name, dp_size):
    a = synthetic(name, dp_size=dp_size, seed=7)
    b = synthetic(name, dp_size=dp_size, seed=7)
    assert a.steps == b.steps and len(a) == GENERATORS[name]
    assert synthetic(name, dp_size=dp_size, seed=8).steps != a.steps
    for step in a.steps:
        assert len(step) == dp_size
        for r in step:
            batch = r.batch()  # every LocalBatch rule holds
            assert isinstance(batch, dg.LocalBatch)
            n, l, real = r.counts(a.spec)
            assert (n, l) == dg.count_tokens(batch, a.spec)
            assert 0 <= real <= n and 0 <= l <= max(n, 0) or r.mode == M.IDLE
            if r.mode == M.DRAFT_EXTEND:
                assert r.accept is not None and len(r.accept) == r.batch_size
                assert all(0 <= x <= a.spec.num_steps for x in r.accept)
                assert real == sum(x + 1 for x in r.accept) <= n
            else:
                assert r.accept is None and real == n


def test_generators_cover_their_modes():
    modes = lambda tr: {r.mode for s in tr.steps for r in s}
    bd = synthetic("balanced-decode", 4)
    assert modes(bd) == {M.DECODE}
    n_max = [max(r.batch_size for r in s) for s in bd.steps]
    assert min(n_max) <= 256 < max(n_max)  # graph-sized and eager steps
    pb = synthetic("prefill-burst", 4)
    assert {M.EXTEND, M.DECODE} <= modes(pb)
    for s in pb.steps:
        ext = [r for r in s if r.mode == M.EXTEND]
        assert len(ext) <= 1 and all(r.extend_tokens <= 512 and not r.can_run_graph for r in ext)
    assert sum(1 for s in pb.steps if any(r.mode == M.EXTEND for r in s)) >= 20
    eg = synthetic("eagle", 4)
    assert modes(eg) == {M.IDLE, M.DRAFT_DECODE, M.TARGET_VERIFY, M.DRAFT_EXTEND}
    S = eg.spec.num_steps
    cycle = [M.DRAFT_DECODE] * S + [M.TARGET_VERIFY, M.DRAFT_EXTEND]
    for i, s in enumerate(eg.steps):  # all busy replicas run the same phase, in cycle order
        assert {r.mode for r in s if r.mode != M.IDLE} == {cycle[i % len(cycle)]}
    assert any(r.batch_size * eg.spec.num_draft_tokens > 256 for s in eg.steps for r in s
               if r.mode == M.TARGET_VERIFY)
    mixed = synthetic("mixed", 4)
    assert modes(mixed) == set(M)
    assert any(all(r.mode == M.IDLE for r in s) for s in mixed.steps)  # a skip step


def test_acceptance_distribution():
    pmf = accept_pmf(3)
    assert pmf.sum() == pytest.approx(1.0) and pmf[3] > 0.7
    assert float(np.dot(np.arange(4), pmf)) == pytest.approx(2.49, abs=0.02)
    acc = [a for s in synthetic("eagle", 4, seed=3, steps=500).steps for r in s if r.accept for a in r.accept]
    assert len(acc) > 1000 and 2.3 < np.mean(acc) < 2.7


def test_steps_and_parts():
    assert len(synthetic("eagle", 2, steps=12)) == 12
    m = synthetic("mixed", 2, steps=30)
    assert len(m) <= 30 and {r.mode for s in m.steps for r in s} >= {M.DECODE, M.EXTEND}
    with pytest.raises(dg.InputError, match="unknown synthetic"):
        synthetic("nope", 2)
    with pytest.raises(dg.InputError):
        synthetic("eagle", 0)
    with pytest.raises(dg.InputError, match="seed must be a non-negative int"):
        synthetic("eagle", 2, seed=-1)
    assert len(synthetic("eagle", 2, seed=2**70, steps=5)) == 5  # any non-negative int seeds


# -- file format --------------------------------------------------------------------------------

def test_round_trip(tmp_path):
    tr = synthetic("mixed", dp_size=3, seed=5)
    p = tmp_path / "m.jsonl"
    save_trace(tr, p)
    back = load_trace(p)
    assert back.steps == tr.steps and back.dp_size == 3 and back.spec == DEFAULT_SPEC
    assert back.step_ids == tr.step_ids and back.name == "mixed"
    head = json.loads(p.read_text().splitlines()[0])
    assert head["format"] == FORMAT and head["dp_size"] == 3


def test_minimal_file_without_header(tmp_path):
    p = _write(tmp_path, [
        _step(0, {"mode": "decode", "batch_size": 2}, {"mode": "IDLE"}),
        "",
        _step(5, {"mode": "EXTEND", "batch_size": 1, "extend_tokens": 9, "logprob_tokens": 3},
              {"mode": "DECODE", "batch_size": 4, "can_run_graph": True}),
    ])
    tr = load_trace(p)
    assert tr.dp_size == 2 and tr.spec is None and tr.step_ids == [0, 5]
    assert tr.steps[1][0] == ReplicaStep(M.EXTEND, 1, 9, 3, False, None)
    assert tr.steps[1][0].counts(None) == (9, 3, 9)


def test_accept_defaults_to_full_acceptance(tmp_path):
    p = _write(tmp_path, [HEADER, _step(0, {"mode": "DRAFT_EXTEND", "batch_size": 2},
                                        {"mode": "DRAFT_EXTEND", "batch_size": 2, "accept": [0, 1]})])
    tr = load_trace(p)
    assert tr.steps[0][0].counts(tr.spec) == (8, 2, 8)
    assert tr.steps[0][1].counts(tr.spec) == (8, 2, 3)


BROKEN = [
    # (lines after the header, line number of the error, fragment of the message, whether the
    # published schema states the rule too -- False: it spans lines or compares fields)
    ([_step(0, {"mode": "IDLE"}, {"mode": "IDLE"}), '{"step": 1, "replicas": [}'], 3, "invalid JSON", None),
    ([_step(0, {"mode": "DECODE", "batch_size": 2, "bs": 1}, {"mode": "IDLE"})], 2, "unknown key", True),
    ([_step(0, {"mode": "IDLE"})], 2, "1 replicas, but the header's dp_size has 2", False),
    ([_step(0, {"mode": "IDLE"}, {"mode": "IDLE"}), _step(1, {"mode": "PREFILL"}, {"mode": "IDLE"})], 3,
     "'mode' must be one of", True),
    ([_step(0, {"mode": "\u0131dle"}, {"mode": "IDLE"})], 2, "'mode' must be one of", True),  # dotless i
    ([_step(0, {"mode": "EXTEND", "batch_size": 4, "extend_tokens": 2}, {"mode": "IDLE"})], 2,
     "replica 0: extend_tokens must be >= batch_size", False),
    ([_step(0, {"mode": "IDLE"}, {"mode": "IDLE", "batch_size": 3})], 2, "replica 1: batch_size must be 0", True),
    ([_step(0, {"mode": "DECODE", "batch_size": 1, "extend_tokens": 3}, {"mode": "IDLE"})], 2,
     "extend_tokens is for EXTEND only", True),
    ([_step(0, {"mode": "DRAFT_EXTEND", "batch_size": 2, "accept": [1]}, {"mode": "IDLE"})], 2,
     "'accept' must be a list of batch_size=2", False),
    ([_step(0, {"mode": "DRAFT_EXTEND", "batch_size": 1, "accept": [4]}, {"mode": "IDLE"})], 2,
     "num_steps=3", False),
    ([_step(0, {"mode": "DECODE", "batch_size": 1, "accept": [1]}, {"mode": "IDLE"})], 2,
     "DRAFT_EXTEND only", True),
    ([_step(3, {"mode": "IDLE"}, {"mode": "IDLE"}), _step(3, {"mode": "IDLE"}, {"mode": "IDLE"})], 3,
     "must increase", False),
    ([_step(0, {"mode": "DECODE", "batch_size": -1}, {"mode": "IDLE"})], 2, "'batch_size' must be >= 0", True),
    ([_step(0, {"mode": "DECODE", "batch_size": 1.5}, {"mode": "IDLE"})], 2, "must be an integer", True),
    ([_step(0, {"mode": "DECODE", "batch_size": 2**31}, {"mode": "IDLE"})], 2,
     "'batch_size' must be <= 2147483647", True),
    ([_step(0, {"mode": "EXTEND", "batch_size": 1, "extend_tokens": 2**31}, {"mode": "IDLE"})], 2,
     "'extend_tokens' must be <= 2147483647", True),
    ([_step(2**63, {"mode": "IDLE"}, {"mode": "IDLE"})], 2, "'step' must be <= 9223372036854775807", True),
    (["[1, 2]"], 2, "must be a JSON object", True),
    ([json.dumps({"replicas": []})], 2, "a step line is", True),
    ([_step(0, {"mode": "IDLE"}, {"mode": "IDLE"}), HEADER], 3, "only be the first line", False),
    # hostile input: never a traceback, always FILE:LINE and one short line
    (['{"step": 0, "replicas": [{"mode": "DECODE", "batch_size": ' + "9" * 5000 + '}, {"mode": "IDLE"}]}'],
     2, "an integer literal with 5000 digits", None),
    (["[" * 100_000], 2, "nested too deeply", None),
    (['{"a": ' * 50_000], 2, "nested too deeply", None),
    (['{"step": 0, "step": 1, "replicas": [{"mode": "IDLE"}, {"mode": "IDLE"}]}'], 2,
     "duplicate key 'step'", None),
    (['{"step": 0, "replicas": [{"mode": "IDLE", "mode": "DECODE"}, {"mode": "IDLE"}]}'], 2,
     "duplicate key 'mode'", None),
    (['{"step": 0, "replicas": [{"mode": "DECODE", "batch_size": NaN}, {"mode": "IDLE"}]}'], 2,
     "NaN is not a JSON number", None),
    (['{"step": 0, "replicas": [{"mode": "DECODE", "batch_size": Infinity}, {"mode": "IDLE"}]}'], 2,
     "Infinity is not a JSON number", None),
    ([_step(0, {"mode": "DECODE", "batch_size": "x" * 10_000}, {"mode": "IDLE"})], 2, "must be an integer", True),
]


@pytest.mark.parametrize("lines,lineno,fragment,in_schema", BROKEN)
def test_broken_lines_name_file_and_line(tmp_path, lines, lineno, fragment, in_schema):
    p = _write(tmp_path, [HEADER] + lines, "broken.jsonl")
    with pytest.raises(dg.InputError) as e:
        load_trace(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:{lineno}:"), msg
    assert fragment in msg, msg
    assert "\n" not in msg and len(msg) < len(str(p)) + 260, msg  # one short line


def test_broken_header_and_files(tmp_path):
    with pytest.raises(dg.InputError, match=r"h\.jsonl:1: unsupported format"):
        load_trace(_write(tmp_path, ['{"format": "dpgather-trace/9"}'], "h.jsonl"))
    with pytest.raises(dg.InputError, match=r"s\.jsonl:1: 'spec' needs exactly the keys"):
        load_trace(_write(tmp_path, ['{"format": "dpgather-trace/1", "spec": {"num_steps": 3}}'], "s.jsonl"))
    with pytest.raises(dg.InputError, match=r"n\.jsonl:1: replica 0: DRAFT_DECODE needs the header's 'spec'"):
        load_trace(_write(tmp_path, [_step(0, {"mode": "DRAFT_DECODE", "batch_size": 1})], "n.jsonl"))
    with pytest.raises(dg.InputError, match="has no steps"):
        load_trace(_write(tmp_path, [HEADER], "e.jsonl"))
    with pytest.raises(dg.InputError, match="cannot read the trace file"):
        load_trace(tmp_path / "missing.jsonl")
    with pytest.raises(dg.InputError, match=r"<trace>:1: invalid JSON"):
        parse_trace(["{"])


def test_head_and_mode_mix():
    tr = Trace(2, None, [(ReplicaStep(M.DECODE, 1), ReplicaStep(M.IDLE))] * 3, [0, 1, 2])
    assert len(tr.head(2)) == 2 and tr.head(None) is tr and tr.head(10) is tr
    assert tr.mode_mix() == {"IDLE": 3, "DECODE": 3}


def test_broken_header_values(tmp_path):
    for header, fragment in (({"name": 3}, "'name' must be a string"),
                             ({"description": ["x"]}, "'description' must be a string"),
                             ({"seed": -1}, "'seed' must be >= 0"),
                             ({"dp_size": 2**31}, "'dp_size' must be <= 2147483647"),
                             ({"spec": {"num_steps": 0, "topk": 1, "num_draft_tokens": 4}},
                              "'spec.num_steps' must be >= 1")):
        p = _write(tmp_path, [json.dumps({"format": FORMAT, **header}), _step(0, {"mode": "IDLE"})], "h.jsonl")
        with pytest.raises(dg.InputError, match=r"h\.jsonl:1: " + fragment.replace(".", r"\.").replace("[", r"\[")):
            load_trace(p)


def test_extend_tokens_int32_max_loads(tmp_path):
    # the largest count the record holds is a valid trace; the replay refuses it for memory
    p = _write(tmp_path, [_step(0, {"mode": "EXTEND", "batch_size": 1, "extend_tokens": 2**31 - 1})])
    assert load_trace(p).steps[0][0].counts(None) == (2**31 - 1, 1, 2**31 - 1)


# -- the published schema ----------------------------------------------------------------------------

def test_schema_is_packaged_and_names_every_mode():
    sch = schema()
    assert sch["$schema"].endswith("2020-12/schema") and sch["title"].startswith("dpgather trace line")
    pattern = sch["$defs"]["replica"]["properties"]["mode"]["pattern"]
    ci = lambda n: "".join(f"[{c}{c.lower()}]" if c.isalpha() else c for c in n)  # noqa: E731
    assert pattern == "^(" + "|".join(ci(m.name) for m in M) + ")$"
    assert sch["$defs"]["header"]["properties"]["format"]["const"] == FORMAT
    assert sch["$defs"]["count"]["maximum"] == 2**31 - 1


def _validator():
    jsonschema = pytest.importorskip("jsonschema")
    cls = jsonschema.Draft202012Validator
    cls.check_schema(schema())
    return cls(schema())


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_schema_accepts_every_line_the_loader_writes(tmp_path, name):
    v = _validator()
    p = tmp_path / "t.jsonl"
    save_trace(synthetic(name, dp_size=3, seed=1), p)
    for line in p.read_text().splitlines():
        errors = list(v.iter_errors(json.loads(line)))
        assert not errors, (line, [e.message for e in errors])


def test_schema_accepts_what_the_loader_accepts(tmp_path):
    v = _validator()
    lines = [HEADER,
             _step(0, {"mode": "decode", "batch_size": 2, "can_run_graph": True},
                   {"mode": "Idle", "batch_size": 0, "extend_tokens": 0, "logprob_tokens": None, "accept": None}),
             _step(1, {"mode": "EXTEND", "batch_size": 1, "extend_tokens": 9, "logprob_tokens": 3},
                   {"mode": "draft_extend", "batch_size": 2, "accept": [0, 3]})]
    load_trace(_write(tmp_path, lines))
    for line in lines:
        assert not list(v.iter_errors(json.loads(line))), line


@pytest.mark.parametrize("lines,lineno,fragment,in_schema", [b for b in BROKEN if b[3] is not None])
def test_schema_and_loader_agree_on_broken_lines(lines, lineno, fragment, in_schema):
    """Per-line rules: the schema refuses the line too. Rules that span lines or compare fields:
    each line alone is valid JSON Schema-wise, and only the loader refuses the file."""
    v = _validator()
    bad_line = ([HEADER] + lines)[lineno - 1]
    assert bool(list(v.iter_errors(json.loads(bad_line)))) is in_schema, bad_line
