"""Seed-scale preset on the meta device: the user's table to the digit, and the bug it hides."""

import pytest

from ocrmem import ConfigError
from ocrmem.compat import has_qwen3
from ocrmem.modeling import format_parameter_report
from ocrmem.presets import EXIT_DOES_NOT_BUILD, EXIT_OK, EXIT_USAGE, build_seed_scale_model, main, seed_scale_counts

USER_LINE = "trainable params: 18,882,560 || all params: 8,607,498,496 || trainable%: 0.2194%"


@pytest.mark.skipif(not has_qwen3(), reason="Qwen3-8B's shape needs Qwen3 (transformers >= 4.51)")
class TestSeedScale:
    def test_component_counts_match_the_published_models(self):
        counts = seed_scale_counts(512)
        assert counts["base_llm"] == (0, 8_190_735_360)  # Qwen3-8B
        assert counts["ocr_embed"] == (0, 397_880_576)  # the user's encoder package
        assert counts["proj"] == (18_882_560, 18_882_560)  # 2,101,248 + 16,781,312

    def test_reproduces_the_users_line_to_the_digit(self):
        report = format_parameter_report(seed_scale_counts(512))
        assert report.splitlines()[0] == USER_LINE
        assert "ocr_embed trainable params: 0 (should be 0)" in report

    def test_construction_fails_with_the_width_mismatch_their_table_hides(self):
        with pytest.raises(ConfigError, match="`vision_embedding_size` is 512 .* emits 1024-d"):
            build_seed_scale_model(vision_embedding_size=512)

    def test_builds_with_1024_and_proj_has_20979712(self):
        model = build_seed_scale_model(vision_embedding_size=1024)
        counts = model.parameter_counts()
        assert counts["proj"] == (20_979_712, 20_979_712)
        assert counts["base_llm"] == (0, 8_190_735_360) and counts["ocr_embed"] == (0, 397_880_576)
        assert all(p.is_meta for p in model.base_llm.parameters())

    def test_cli_prints_table_and_the_failure_but_exits_0_by_default(self, capsys):
        assert main([]) == EXIT_OK
        out = capsys.readouterr().out
        assert USER_LINE in out and "building this model fails" in out and "emits 1024" in out

    def test_cli_check_exits_1_only_when_the_configuration_does_not_build(self, capsys):
        assert main(["--check"]) == EXIT_DOES_NOT_BUILD
        assert "building this model fails" in capsys.readouterr().out
        assert main(["--check", "--vision-embedding-size", "1024"]) == EXIT_OK
        assert "this configuration builds." in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, reason",
    [
        (["--vision-embedding-size", "0"], "--vision-embedding-size must be >= 1, got 0"),
        (["--vision-embedding-size", "many"], "invalid int value: 'many'"),
        (["--readout", "pixels"], "invalid choice: 'pixels'"),
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(argv, reason, capsys):
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert reason in err[-1] and "Traceback" not in "\n".join(err)


def test_cli_help_documents_the_exit_codes(capsys):
    assert main(["--help"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "exit status:" in out and "--check" in out
    assert all(f"  {code}  " in out for code in ("0", "1", "2"))
