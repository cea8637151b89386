"""Loading and saving MEMModel directories: nothing lost, nothing silent, nothing run.

* a directory without its adapter is an error unless ``fresh_proj=True`` (which warns);
* a saved directory loads from another working directory and after moving;
* NaN/inf weights are refused at load, naming the tensor;
* bad paths and configs are clear errors (not ``AttributeError`` or "upgrade transformers");
* files are written with the umask's mode (0644 under 022), not 0600;
* a model directory asking for custom code (``auto_map``) is refused, at a terminal too.
"""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ocrmem import MEMConfig, MEMModel
from ocrmem.data import build_sample_batch
from ocrmem.errors import CheckpointError, ConfigError, FreshProjectorWarning, InputTypeError, RemoteCodeError

REPO = Path(__file__).resolve().parents[2]


def _copy(tiny_dir: Path, target: Path, *, models: bool = False) -> Path:
    """A copy of the preset's MEMModel files (config + adapter), and its llm/ocr dirs if asked."""
    target.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_dir / name, target / name)
    config = json.loads((tiny_dir / "config.json").read_text())
    if models:
        shutil.copytree(tiny_dir / "llm", target / "llm")
        shutil.copytree(tiny_dir / "ocr", target / "ocr")
    else:  # point at the preset's own model dirs
        config.update(base_model_name=str(tiny_dir / "llm"), ocr_model_name=str(tiny_dir / "ocr"))
    (target / "config.json").write_text(json.dumps(config))
    return target


def _logits(model: MEMModel, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**batch).logits


class TestMissingAdapter:
    def test_dir_without_adapter_is_an_error_naming_the_file_and_the_flag(self, tiny_dir, tmp_path):
        model_dir = _copy(tiny_dir, tmp_path / "m")
        (model_dir / "model.safetensors").unlink()
        with pytest.raises(CheckpointError, match=r"model.safetensors does not exist.*fresh_proj=True"):
            MEMModel.from_pretrained(model_dir)

    def test_adapter_path_that_is_a_directory_is_an_error(self, tiny_dir, tmp_path):
        model_dir = _copy(tiny_dir, tmp_path / "m")
        (model_dir / "model.safetensors").unlink()
        (model_dir / "model.safetensors").mkdir()
        with pytest.raises(CheckpointError, match=r"model.safetensors is a directory"):
            MEMModel.from_pretrained(model_dir)

    def test_fresh_proj_loads_with_a_warning(self, tiny_dir, tmp_path):
        model_dir = _copy(tiny_dir, tmp_path / "m")
        (model_dir / "model.safetensors").unlink()
        with pytest.warns(FreshProjectorWarning, match="fresh random initialisation.*has no model.safetensors"):
            model = MEMModel.from_pretrained(model_dir, fresh_proj=True)
        assert [n for n, p in model.named_parameters() if p.requires_grad] == [n for n, _ in model.proj.named_parameters("proj")]

    def test_fresh_proj_ignores_saved_weights_and_says_so(self, tiny_dir):
        saved = load_file(str(tiny_dir / "model.safetensors"))
        torch.manual_seed(123)  # another init than the preset's
        with pytest.warns(FreshProjectorWarning, match="model.safetensors is ignored"):
            model = MEMModel.from_pretrained(tiny_dir, fresh_proj=True)
        assert not torch.equal(model.proj[0].weight, saved["proj.0.weight"])


class TestPortableSave:
    def test_save_loads_from_another_working_dir_and_parent(self, tiny_dir, tmp_path, monkeypatch):
        # The preset names its models "llm"/"ocr" relative to itself; a save elsewhere used to
        # keep those names, which then resolved against the new dir and failed.
        model = MEMModel.from_pretrained(tiny_dir)
        with torch.no_grad():
            for param in model.proj.parameters():
                param.add_(torch.randn_like(param))
        (tmp_path / "work").mkdir()
        monkeypatch.chdir(tmp_path / "work")
        model.save_pretrained("runs/out")  # relative to this working dir
        saved = json.loads((tmp_path / "work" / "runs" / "out" / "config.json").read_text())
        assert saved["base_model_name"] == str((tiny_dir / "llm").resolve())
        assert saved["ocr_model_name"] == str((tiny_dir / "ocr").resolve())
        assert model.config.base_model_name == "llm"  # the live config is left alone
        (tmp_path / "elsewhere").mkdir()
        monkeypatch.chdir(tmp_path / "elsewhere")
        reloaded = MEMModel.from_pretrained(tmp_path / "work" / "runs" / "out")
        batch = build_sample_batch(model, batch_size=1)
        torch.testing.assert_close(_logits(reloaded, batch), _logits(model, batch), rtol=0, atol=0)

    def test_dir_holding_its_models_stays_relative_and_moves(self, tiny_dir, tmp_path, monkeypatch):
        preset = _copy(tiny_dir, tmp_path / "a" / "preset", models=True)
        config = json.loads((preset / "config.json").read_text())
        config.update(base_model_name="llm", ocr_model_name="ocr")
        (preset / "config.json").write_text(json.dumps(config))
        MEMModel.from_pretrained(preset).save_pretrained(preset)
        assert json.loads((preset / "config.json").read_text())["base_model_name"] == "llm"
        moved = shutil.move(str(preset), str(tmp_path / "b" / "moved"))
        monkeypatch.chdir(tmp_path)
        model = MEMModel.from_pretrained(moved)
        assert model._source_dirs["base_model_name"][1] == (tmp_path / "b" / "moved" / "llm").resolve()

    def test_name_changed_on_the_config_is_written_as_set(self, tiny_dir, tmp_path):
        model = MEMModel.from_pretrained(tiny_dir)
        model.config.ocr_model_name = "/models/DeepSeek-OCR"
        model.save_pretrained(tmp_path)
        assert json.loads((tmp_path / "config.json").read_text())["ocr_model_name"] == "/models/DeepSeek-OCR"


class TestNonFiniteWeights:
    @pytest.mark.parametrize("bad", [float("nan"), float("inf")])
    def test_adapter_weight_is_refused_naming_the_tensor(self, tiny_dir, tmp_path, bad):
        model_dir = _copy(tiny_dir, tmp_path / "m")
        weights = load_file(str(model_dir / "model.safetensors"))
        weights["proj.2.bias"][3] = bad
        save_file(weights, str(model_dir / "model.safetensors"))
        with pytest.raises(CheckpointError, match=r"tensor 'proj.2.bias' holds (1 NaN|0 NaN and 1 inf)"):
            MEMModel.from_pretrained(model_dir)

    def test_fp16_weights_whose_sum_overflows_are_finite(self):
        from ocrmem.validation import check_finite

        weights = torch.full((1000,), 1000.0, dtype=torch.float16)  # sums to inf in fp16
        check_finite([("w", weights)], "test")
        weights[7] = float("-inf")
        with pytest.raises(CheckpointError, match=r"'w' holds 0 NaN and 1 inf"):
            check_finite([("w", weights)], "test")

    def test_encoder_weight_is_refused(self, tiny_dir, tmp_path):
        ocr = Path(shutil.copytree(tiny_dir / "ocr", tmp_path / "ocr"))
        weights = load_file(str(ocr / "model.safetensors"))
        key = next(k for k, v in weights.items() if v.is_floating_point() and "sam_model" in k and v.ndim > 1)
        weights[key].view(-1)[0] = float("inf")
        save_file(weights, str(ocr / "model.safetensors"))
        config = MEMConfig(base_model_name=str(tiny_dir / "llm"), ocr_model_name=str(ocr))
        with pytest.raises(CheckpointError, match=r"inf"):
            MEMModel(config)


class TestBadPaths:
    @pytest.mark.parametrize("value", [None, "", 3])
    def test_not_a_path_is_a_type_error(self, value):
        with pytest.raises(InputTypeError, match=rf"`pretrained_model_name_or_path` is {value!r}; pass the path"):
            MEMModel.from_pretrained(value)

    def test_file_is_not_a_directory(self, tiny_dir):
        with pytest.raises(NotADirectoryError, match="config.json' is a file"):
            MEMModel.from_pretrained(tiny_dir / "config.json")

    def test_config_that_is_a_json_list_is_named(self, tiny_dir, tmp_path):
        model_dir = _copy(tiny_dir, tmp_path / "m")
        (model_dir / "config.json").write_text("[1, 2]")
        with pytest.raises(CheckpointError, match=r"config.json holds a JSON list, not an object"):
            MEMModel.from_pretrained(model_dir)

    def test_llm_dir_given_as_the_memmodel_dir_is_named(self, tiny_dir):
        with pytest.raises(CheckpointError, match=r"is a 'qwen[23]' config, not a MEMModel one"):
            MEMModel.from_pretrained(tiny_dir / "llm")

    def test_ocr_dir_as_base_model_name_says_where_it_belongs(self, tiny_dir):
        # transformers itself says the model type is unknown and suggests upgrading.
        with pytest.raises(ConfigError, match=r"`base_model_name` = .*ocr.*'deepseek_vl_v2'.*belongs in `ocr_model_name`"):
            MEMModel.from_pretrained(tiny_dir, base_model_name=str(tiny_dir / "ocr"))

    def test_llm_dir_without_config_is_named(self, tiny_dir, tmp_path):
        (tmp_path / "empty").mkdir()
        with pytest.raises(CheckpointError, match=r"`base_model_name` = .*empty.*has no config.json"):
            MEMModel(MEMConfig(base_model_name=str(tmp_path / "empty"), ocr_model_name=str(tiny_dir / "ocr")))

    @pytest.mark.parametrize("part", ["base_llm", "ocr_embed", "tokenizer"])
    def test_ready_part_of_wrong_type_is_named(self, tiny_dir, part):
        with pytest.raises(InputTypeError, match=rf"`{part}` has type str"):
            MEMModel.from_pretrained(tiny_dir, **{part: "llm"})

    def test_fresh_proj_must_be_a_bool(self, tiny_dir):
        with pytest.raises(InputTypeError, match=r"`fresh_proj` is 'no'"):
            MEMModel.from_pretrained(tiny_dir, fresh_proj="no")

    def test_missing_adapter_file_is_not_called_corrupt(self, tiny_model, tmp_path):
        with pytest.raises(FileNotFoundError, match=r"adapter weights .*nope.safetensors' do not exist"):
            tiny_model.load_adapter_weights(tmp_path / "nope.safetensors")

    def test_misspelt_override_suggests_the_field(self, tiny_dir):
        with pytest.raises(ConfigError, match=r"`context_treshold` is not a MEMConfig field — did you mean `context_threshold`"):
            MEMModel.from_pretrained(tiny_dir, context_treshold=16)

    def test_save_into_a_file_path_is_refused(self, tiny_model, tmp_path):
        (tmp_path / "file").write_text("x")
        with pytest.raises(NotADirectoryError, match="is a file, not a directory"):
            tiny_model.save_pretrained(tmp_path / "file")
        with pytest.raises(NotADirectoryError, match="a parent is a file"):
            tiny_model.save_pretrained(tmp_path / "file" / "sub")

    def test_tiny_cli_into_a_file_exits_2_with_one_line(self, tmp_path, capsys):
        from ocrmem.tiny import main

        (tmp_path / "file").write_text("x")
        assert main([str(tmp_path / "file")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is a file" in err and "give a new or existing directory" in err


class TestFileModes:
    @staticmethod
    def _umask() -> int:
        umask = os.umask(0o022)
        os.umask(umask)
        return umask

    @pytest.mark.parametrize("umask", [0o022, 0o077])
    def test_save_follows_the_umask(self, tiny_model, tmp_path, umask):
        before = os.umask(umask)
        try:
            tiny_model.save_pretrained(tmp_path)
        finally:
            os.umask(before)
        for name in ("model.safetensors", "config.json"):
            assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name

    def test_tiny_preset_files_read_like_any_file(self, tiny_dir):
        expected = 0o666 & ~self._umask()
        modes = {str(p.relative_to(tiny_dir)): oct(p.stat().st_mode & 0o777) for p in tiny_dir.rglob("*") if p.is_file()}
        assert set(modes.values()) == {oct(expected)}, modes


# ----------------------------------------------------------------------------- remote code

_CUSTOM_CODE = """
from pathlib import Path
Path(__file__).with_name("CODE_RAN").write_text("the custom code ran")
from transformers import PretrainedConfig
class EvilConfig(PretrainedConfig):
    model_type = "evil_lm"
"""


def _evil_llm(tiny_dir: Path, target: Path, *, unknown_type: bool) -> Path:
    """A copy of the tiny LLM whose config asks for custom code (and ships it)."""
    shutil.copytree(tiny_dir / "llm", target)
    config = json.loads((target / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilLM"}
    if unknown_type:
        config["model_type"] = "evil_lm"
    (target / "config.json").write_text(json.dumps(config))
    (target / "configuration_evil.py").write_text(_CUSTOM_CODE)
    (target / "modeling_evil.py").write_text(_CUSTOM_CODE)
    return target


class TestRemoteCode:
    def test_llm_dir_with_auto_map_is_refused(self, tiny_dir, tmp_path):
        evil = _evil_llm(tiny_dir, tmp_path / "evil", unknown_type=False)
        config = MEMConfig(base_model_name=str(evil), ocr_model_name=str(tiny_dir / "ocr"))
        with pytest.raises(RemoteCodeError, match=r"config.json has `auto_map`.*never does \(trust_remote_code=False\)"):
            MEMModel(config)
        assert not (evil / "CODE_RAN").exists()

    def test_tokenizer_config_with_auto_map_is_refused(self, tiny_dir, tmp_path):
        llm = Path(shutil.copytree(tiny_dir / "llm", tmp_path / "llm"))
        tok = json.loads((llm / "tokenizer_config.json").read_text())
        tok["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
        (llm / "tokenizer_config.json").write_text(json.dumps(tok))
        with pytest.raises(RemoteCodeError, match=r"tokenizer_config.json has `auto_map`"):
            MEMModel(MEMConfig(base_model_name=str(llm), ocr_model_name=str(tiny_dir / "ocr")))

    @pytest.mark.slow  # a fresh interpreter importing torch + transformers: ~25 s on 2 busy cores
    def test_refused_at_a_terminal_without_a_prompt(self, tiny_dir, tmp_path):
        """At a TTY transformers asks "Do you wish to run the custom code? [y/N]" unless told
        trust_remote_code=False: neither MEMModel nor the project's loaders may let it ask."""
        known = _evil_llm(tiny_dir, tmp_path / "known_type", unknown_type=False)
        unknown = _evil_llm(tiny_dir, tmp_path / "unknown_type", unknown_type=True)
        script = textwrap.dedent(
            f"""
            import sys
            print("isatty", sys.stdin.isatty(), flush=True)
            from ocrmem import MEMConfig, MEMModel
            from ocrmem import compat
            try:
                MEMModel(MEMConfig(base_model_name={str(known)!r}, ocr_model_name={str(tiny_dir / 'ocr')!r}))
            except Exception as err:
                print("MEMModel:", type(err).__name__, err, flush=True)
            import time
            for load in (compat.load_causal_lm, compat.load_tokenizer):
                start = time.monotonic()
                try:
                    load({str(unknown)!r})
                    print(load.__name__ + ": loaded", flush=True)
                except Exception as err:
                    print(load.__name__ + ":", type(err).__name__, err, flush=True)
                print("took", round(time.monotonic() - start, 1), flush=True)
            print("DONE", flush=True)
            """
        )
        output = _run_at_a_terminal([sys.executable, "-c", script], timeout=180)
        assert "isatty True" in output
        assert "Do you wish to run the custom code" not in output
        assert "MEMModel: RemoteCodeError" in output
        assert "load_causal_lm: ValueError" in output and "trust_remote_code" in output
        assert "load_tokenizer:" in output and "DONE" in output
        assert not (known / "CODE_RAN").exists() and not (unknown / "CODE_RAN").exists()


def _run_at_a_terminal(argv: list[str], timeout: float) -> str:
    """Run ``argv`` with a pseudo-terminal as stdin/stdout/stderr; return what it printed.

    Nothing is ever typed: a prompt would wait (transformers gives up after 15 s) and show up in
    the output.
    """
    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(master)
    return b"".join(chunks).decode("utf-8", "replace")
