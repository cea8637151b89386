"""The ``--json`` report is pinned by ``diagnostics/report.schema.json``.

Real reports — healthy and buggy, the tiny MEMModel and stock transformers models (a bare
``LlamaForCausalLM`` and the zoo's MEM-like wrappers around one), one batch and many, with
``--data`` findings, load-time messages and a run error — must validate; a renamed or
dropped key must not; and the schema file cannot change without a version bump.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from pathlib import Path

import pytest

jsonschema = pytest.importorskip("jsonschema", reason="pip install jsonschema (in the dev extra)")

import zoo  # noqa: E402
from diagnostics import CAUSES, diagnose  # noqa: E402
from diagnostics.grad_flow import main  # noqa: E402
from diagnostics.report import SCHEMA_FILE, SCHEMA_VERSION, load_schema  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = ROOT / "diagnostics" / SCHEMA_FILE
FACTORIES = Path(__file__).resolve().parent / "diag_factories.py"

#: sha256 of the canonical schema (sorted keys, no whitespace), per SCHEMA_VERSION. Changing
#: the schema means: bump SCHEMA_VERSION (diagnostics/report.py), the schema's `version`
#: const and `$id`, add a line to its description's version history, and add the new hash here.
SCHEMA_SHA256 = {
    2: "634710cdd4e62decd8e2ce92f543b1da35c89be959542f04fd5368a8b87f4968",
}

#: (LibraryInferenceEncoder needs the function-scoped fake_site fixture; its keys are declared all the same)
ZOO_BUGS = [
    zoo.ProjUnderNoGrad, zoo.DetachedVisionEmbeds, zoo.BlanketFreeze, zoo.ReentrantCheckpoint,
    zoo.SetGradEnabledOff, zoo.DataAttribute, zoo.NumpyRoundTrip,
    zoo.TolistRewrap, zoo.UnregisteredProj, zoo.LlmUnderNoGrad, zoo.FrozenInEval, zoo.TrackedPixels,
]


def _canonical_hash(schema: dict) -> str:
    return hashlib.sha256(json.dumps(schema, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _json(report) -> dict:
    return json.loads(json.dumps(report.to_json(), default=str))  # exactly what --json writes


@pytest.fixture(scope="module")
def validator():
    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture(scope="module")
def reports(tiny_dir, tmp_path_factory) -> dict[str, dict]:
    """Real reports, by a short name."""
    from ocrmem import MEMModel
    from ocrmem.data import build_sample_batch

    out: dict[str, dict] = {}
    # the tiny MEMModel, healthy and with proj frozen
    mem = MEMModel.from_pretrained(tiny_dir)
    batch = build_sample_batch(mem, batch_size=2, seed=0)
    out["mem_healthy"] = _json(diagnose(mem, batch, ["proj"]))
    mem.proj.requires_grad_(False)
    out["mem_proj_frozen"] = _json(diagnose(mem, batch, ["proj"]))
    # a stock transformers model, bare: lm_head trains / everything frozen / a wrong pattern
    llama = zoo.tiny_llama()
    llama.requires_grad_(False)
    llama.lm_head.requires_grad_(True)
    ids = zoo.make_batch()["input_ids"]
    out["llama_healthy"] = _json(diagnose(llama, {"input_ids": ids, "labels": ids}, ["lm_head"]))
    out["llama_bad_pattern"] = _json(diagnose(llama, {"input_ids": ids, "labels": ids}, ["*lora_*"]))
    llama.requires_grad_(False)
    out["llama_all_frozen"] = _json(diagnose(llama, {"input_ids": ids, "labels": ids}, ["lm_head"]))
    # the zoo: MEM-like models around a stock LlamaForCausalLM, healthy and with every bug
    out["zoo_healthy"] = _json(diagnose(zoo.MemLike(), zoo.make_batch(), ["proj"]))
    out["zoo_nan"] = _json(diagnose(zoo.MemLike(), zoo.make_batch(all_ignored=True), ["proj"]))
    for cls in ZOO_BUGS:
        out[f"zoo_{cls.__name__}"] = _json(diagnose(cls(), zoo.make_batch(), ["proj"]))
    # the CLI: two batches merged, --data findings, load messages; and a run error
    tmp = tmp_path_factory.mktemp("schema")
    data = tmp / "d.jsonl"
    long_history = "My cat is called Mochi. " + "We talked about the plans for the weekend. " * 8
    rows = [{"history": long_history, "prompt": "Cat?", "response": "Mochi"},
            {"history": "", "prompt": "hi", "response": "hello"}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    for name, argv in [
        ("cli_mem_data", [str(tiny_dir), "--data", str(data), "--batch-size", "1", "--batches", "3"]),
        ("cli_run_error", [f"--factory={FACTORIES}:shape_mismatch"]),
        ("cli_factory_bug", [f"--factory={FACTORIES}:blanket_freeze"]),
    ]:
        target = tmp / f"{name}.json"
        main([*argv, "--json", str(target), "--quiet"])
        out[name] = json.loads(target.read_text(encoding="utf-8"))
    return out


def test_every_real_report_validates(reports, validator) -> None:
    for name, report in reports.items():
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(report)]
        assert not errors, f"{name}: {errors[:5]}"


def test_the_reports_cover_both_statuses_and_the_optional_parts(reports) -> None:
    """The validation above means something only if the reports hold what the schema allows."""
    statuses = {name: r["status"] for name, r in reports.items()}
    assert statuses["mem_healthy"] == statuses["llama_healthy"] == statuses["zoo_healthy"] == "ok"
    assert statuses["mem_proj_frozen"] == statuses["llama_all_frozen"] == "error"
    seen_causes = {f["cause"] for r in reports.values() for f in r["findings"]}
    assert {"grad_disabled", "detached", "not_trainable", "reentrant_checkpoint", "nan_loss",
            "wasted_tracking", "no_memory", "fewer_batches"} <= seen_causes
    assert reports["cli_run_error"]["error"] is not None and reports["cli_mem_data"]["batches"]
    finding_keys = {k for r in reports.values() for f in r["findings"] for k in f}
    declared = set(load_schema()["$defs"]["finding"]["properties"])
    # every key the schema declares for findings is produced by some real report here, except the
    # --data keys only renderer problems produce (test_diag_data.py), a library's call site
    # (needs the fake_site fixture) and a forward error explained by a finding
    assert declared - finding_keys <= {"characters", "pages_needed", "call_site", "explains_error"}, declared - finding_keys


@pytest.mark.parametrize(
    "path",
    [("findings",), ("loss", "grad_fn"), ("params", "trainable"), ("findings", 0, "cause"),
     ("findings", 0, "line"), ("modules", 0, "gets_grad"), ("batches", 0, "index"), ("error",), ("version",)],
)
def test_a_renamed_key_fails(reports, validator, path) -> None:
    report = copy.deepcopy(reports["cli_mem_data"])
    container = report
    for key in path[:-1]:
        container = container[key]
    assert path[-1] in container, f"the sample report lacks {path}"
    container[f"{path[-1]}_renamed"] = container.pop(path[-1])
    assert not validator.is_valid(report), f"renaming {path} went unnoticed"


def test_an_unknown_cause_or_zero_based_batch_fails(reports, validator) -> None:
    report = copy.deepcopy(reports["cli_mem_data"])
    report["findings"][0]["cause"] = "renamed_cause"
    assert not validator.is_valid(report)
    report = copy.deepcopy(reports["cli_mem_data"])
    report["batches"][0]["index"] = 0
    assert not validator.is_valid(report)


def test_schema_causes_are_the_catalogue() -> None:
    """A new cause is a schema change (and so a version bump): the enum must list CAUSES."""
    schema = load_schema()
    assert schema["$defs"]["finding"]["properties"]["cause"]["enum"] == sorted(CAUSES)
    assert schema["$defs"]["batch"]["properties"]["causes"]["items"]["enum"] == sorted(CAUSES)


def test_the_schema_cannot_change_without_a_version_bump() -> None:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    assert schema["properties"]["version"] == {"const": SCHEMA_VERSION}
    assert schema["$id"].endswith(f":v{SCHEMA_VERSION}")
    assert f"{SCHEMA_VERSION} - " in schema["description"], "describe the new version in the schema's description"
    assert SCHEMA_VERSION in SCHEMA_SHA256, (
        f"SCHEMA_VERSION {SCHEMA_VERSION} has no stored hash: add {_canonical_hash(schema)!r} to SCHEMA_SHA256"
    )
    assert _canonical_hash(schema) == SCHEMA_SHA256[SCHEMA_VERSION], (
        f"{SCHEMA_FILE} changed but SCHEMA_VERSION is still {SCHEMA_VERSION}: bump it (report.py, the schema's "
        "`version` const and `$id`, its description) and store the new hash"
    )


def test_the_schema_ships_as_package_data() -> None:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        tomllib = pytest.importorskip("tomli")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert SCHEMA_FILE in pyproject["tool"]["setuptools"]["package-data"]["diagnostics"]
    assert load_schema() == json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
