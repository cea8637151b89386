"""diagnostics.lint on a table of grad-breaking forms, each beside its healthy twin.

Every row is one spelling of a bug in a method ``forward`` reaches (``embed``), and the
smallest change that makes it healthy. The bug must give exactly the warnings on the
lines marked ``# <-`` (so a finding on the wrong ``with`` of a nest fails), and exit
status 1; the twin must give no warning at all (infos allowed) and exit status 0.
``self.vision_tower`` is a frozen encoder (no_grad around it alone is the LLaVA
pattern), ``self.proj`` the trainable layer.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from diagnostics.lint import lint_file, main

TEMPLATE = '''\
import torch
from torch import nn
{imports}

class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.vision_tower = nn.Linear(4, 4)
        self.proj = nn.Linear(4, 4)

    def forward(self, px):
        return self.embed(px)

{method}
'''

GD, DT = "grad_disabled", "detached"

# (id, extra imports, bug, healthy twin, kind of the marked warnings)
ROWS = [
    # ---- decorators, with and without a call
    ("decorator_no_grad_bare", "",
     "@torch.no_grad  # <-\ndef embed(self, px):\n    return self.proj(px)",
     "@torch.enable_grad\ndef embed(self, px):\n    return self.proj(px)", GD),
    ("decorator_no_grad_call", "",
     "@torch.no_grad()  # <-\ndef embed(self, px):\n    return self.proj(self.vision_tower(px))",
     "def embed(self, px):\n    return self.proj(self.encode(px))\n\n"
     "@torch.no_grad()\ndef encode(self, px):\n    return self.vision_tower(px)", GD),
    ("decorator_inference_mode_bare", "",
     "@torch.inference_mode  # <-\ndef embed(self, px):\n    return self.proj(px)",
     "@torch.inference_mode(mode=False)\ndef embed(self, px):\n    return self.proj(px)", GD),
    ("decorator_inference_mode_call", "",
     "@torch.inference_mode()  # <-\ndef embed(self, px):\n    return self.proj(px)",
     "@torch.inference_mode(False)\ndef embed(self, px):\n    return self.proj(px)", GD),
    ("decorator_enable_grad_applied_last_wins", "",
     "@torch.enable_grad()\n@torch.no_grad()  # <-\ndef embed(self, px):\n    return self.proj(px)",
     "@torch.no_grad()\n@torch.enable_grad()\ndef embed(self, px):\n    return self.proj(px)", GD),
    # ---- inference_mode's argument
    ("inference_mode_keyword_true", "",
     "def embed(self, px):\n    with torch.inference_mode(mode=True):  # <-\n        return self.proj(px)",
     "def embed(self, px):\n    with torch.inference_mode(mode=False):\n        return self.proj(px)", GD),
    ("inference_mode_positional_true", "",
     "def embed(self, px):\n    with torch.inference_mode(True):  # <-\n        return self.proj(px)",
     "def embed(self, px):\n    with torch.inference_mode(False):\n        return self.proj(px)", GD),
    ("inference_mode_around_proj", "",
     "def embed(self, px):\n    with torch.inference_mode():  # <-\n        feats = self.vision_tower(px)\n"
     "        out = self.proj(feats)\n    return out",
     "def embed(self, px):\n    with torch.inference_mode():\n        feats = self.vision_tower(px)\n"
     "    return self.proj(feats.clone())", GD),
    # ---- import spellings
    ("alias_from_torch_import_no_grad_as", "from torch import no_grad as ng",
     "def embed(self, px):\n    with ng():  # <-\n        return self.proj(px)",
     "def embed(self, px):\n    with ng():\n        feats = self.vision_tower(px)\n    return self.proj(feats)", GD),
    ("alias_decorator_bare", "from torch import no_grad as ng",
     "@ng  # <-\ndef embed(self, px):\n    return self.proj(px)",
     "def embed(self, px):\n    return self.proj(px)", GD),
    ("alias_import_torch_as", "import torch as T",
     "def embed(self, px):\n    with T.no_grad():  # <-\n        return self.proj(px)",
     "def embed(self, px):\n    with T.enable_grad():\n        return self.proj(px)", GD),
    ("alias_from_torch_import_inference_mode", "from torch import inference_mode",
     "def embed(self, px):\n    with inference_mode():  # <-\n        return self.proj(px)",
     "def embed(self, px):\n    with inference_mode(False):\n        return self.proj(px)", GD),
    ("grad_mode_module_path", "",
     "def embed(self, px):\n    with torch.autograd.grad_mode.no_grad():  # <-\n        return self.proj(px)",
     "def embed(self, px):\n    with torch.autograd.grad_mode.enable_grad():\n        return self.proj(px)", GD),
    ("grad_mode_module_alias", "import torch.autograd.grad_mode as gm",
     "@gm.no_grad()  # <-\ndef embed(self, px):\n    return self.proj(px)",
     "@gm.enable_grad()\ndef embed(self, px):\n    return self.proj(px)", GD),
    ("alias_set_grad_enabled", "from torch import set_grad_enabled as sge",
     "def embed(self, px):\n    with sge(False):  # <-\n        return self.proj(px)",
     "def embed(self, px):\n    with sge(True):\n        return self.proj(px)", GD),
    # ---- nesting: the innermost grad context decides
    ("nested_no_grad_inside_enable_grad", "",
     "def embed(self, px):\n    with torch.enable_grad():\n        with torch.no_grad():  # <-\n"
     "            return self.proj(px)",
     "def embed(self, px):\n    with torch.no_grad():\n        with torch.enable_grad():\n"
     "            return self.proj(px)", GD),
    ("nested_outer_block_holds_proj", "",
     "def embed(self, px):\n    with torch.no_grad():  # <-\n        with torch.no_grad():\n"
     "            feats = self.vision_tower(px)\n        out = self.proj(feats)\n    return out",
     "def embed(self, px):\n    with torch.enable_grad():\n        with torch.no_grad():\n"
     "            feats = self.vision_tower(px)\n        out = self.proj(feats)\n    return out", GD),
    ("nested_inner_block_holds_proj", "",
     "def embed(self, px):\n    with torch.no_grad():\n        feats = self.vision_tower(px)\n"
     "        with torch.inference_mode():  # <-\n            out = self.proj(feats)\n    return out",
     "def embed(self, px):\n    with torch.no_grad():\n        feats = self.vision_tower(px)\n"
     "        with torch.enable_grad():\n            out = self.proj(feats)\n    return out", GD),
    ("one_with_two_items_later_is_inner", "",
     "def embed(self, px):\n    with torch.enable_grad(), torch.no_grad():  # <-\n        return self.proj(px)",
     "def embed(self, px):\n    with torch.no_grad(), torch.enable_grad():\n        return self.proj(px)", GD),
    ("under_a_branch", "",
     "def embed(self, px):\n    if px.dim() == 2:\n        with torch.no_grad():  # <-\n            px = self.proj(px)\n"
     "    return px",
     "def embed(self, px):\n    if px.dim() == 2:\n        with torch.no_grad():\n            px = self.vision_tower(px)\n"
     "    return self.proj(px)", GD),
    # ---- methods called from forward (two levels down) / not called at all
    ("method_two_calls_deep", "",
     "def embed(self, px):\n    return self._project(self.vision_tower(px))\n\n"
     "def _project(self, feats):\n    with torch.no_grad():  # <-\n        return self.proj(feats)",
     "def embed(self, px):\n    return self.proj(self.vision_tower(px))\n\n"
     "def _project(self, feats):\n    with torch.no_grad():\n        return self.proj(feats)", GD),
    ("block_around_a_method_call", "",
     "def embed(self, px):\n    with torch.no_grad():  # <-\n        return self._project(px)\n\n"
     "def _project(self, px):\n    return self.proj(px)",
     "def embed(self, px):\n    with torch.no_grad():\n        feats = self.vision_tower(px)\n"
     "    return self._project(feats)\n\n"
     "def _project(self, px):\n    return self.proj(px)", GD),
    # ---- set_grad_enabled
    ("set_grad_enabled_false_never_restored", "",
     "def embed(self, px):\n    torch.set_grad_enabled(False)  # <-\n    return self.proj(px)",
     "def embed(self, px):\n    torch.set_grad_enabled(True)\n    return self.proj(px)", GD),
    ("set_grad_enabled_false_keyword", "",
     "def embed(self, px):\n    torch.set_grad_enabled(mode=False)  # <-\n    return self.proj(px)",
     "def embed(self, px):\n    torch.set_grad_enabled(mode=True)\n    return self.proj(px)", GD),
    ("set_grad_enabled_restored_after_proj", "",
     "def embed(self, px):\n    torch.set_grad_enabled(False)  # <-\n    feats = self.vision_tower(px)\n"
     "    out = self.proj(feats)\n    torch.set_grad_enabled(True)\n    return out",
     "def embed(self, px):\n    torch.set_grad_enabled(False)\n    feats = self.vision_tower(px)\n"
     "    torch.set_grad_enabled(True)\n    return self.proj(feats)", GD),
    ("set_grad_enabled_restored_to_previous", "",
     "def embed(self, px):\n    prev = torch.is_grad_enabled()\n    torch.set_grad_enabled(False)  # <-\n"
     "    out = self.proj(self.vision_tower(px))\n    torch.set_grad_enabled(prev)\n    return out",
     "def embed(self, px):\n    prev = torch.is_grad_enabled()\n    torch.set_grad_enabled(False)\n"
     "    feats = self.vision_tower(px)\n    torch.set_grad_enabled(prev)\n    return self.proj(feats)", GD),
    ("set_grad_enabled_restored_in_finally", "",
     "def embed(self, px):\n    torch.set_grad_enabled(False)  # <-\n    try:\n        out = self.proj(px)\n"
     "    finally:\n        torch.set_grad_enabled(True)\n    return out",
     "def embed(self, px):\n    torch.set_grad_enabled(False)\n    try:\n        feats = self.vision_tower(px)\n"
     "    finally:\n        torch.set_grad_enabled(True)\n    return self.proj(feats)", GD),
    ("set_grad_enabled_block", "",
     "def embed(self, px):\n    with torch.set_grad_enabled(False):  # <-\n        return self.proj(px)",
     "def embed(self, px):\n    with torch.set_grad_enabled(True):\n        return self.proj(px)", GD),
    # ---- cuts
    ("detach_returned", "",
     "def embed(self, px):\n    out = self.proj(px)\n    return out.detach()  # <-",
     "def embed(self, px):\n    out = self.proj(px)\n    self.last = out.detach()\n    return out", DT),
    ("data_returned", "",
     "def embed(self, px):\n    out = self.proj(px).data  # <-\n    return out",
     "def embed(self, px):\n    out = self.proj(px)\n    self.norm = out.data.norm()\n    return out", DT),
    ("numpy_round_trip", "",
     "def embed(self, px):\n    out = self.proj(px)\n    return torch.from_numpy(out.detach().cpu().numpy())  # <-",
     "def embed(self, px):\n    out = self.proj(px)\n    self.stats = out.detach().cpu().numpy()\n    return out", DT),
    ("numpy_round_trip_aliases", "import torch as T\nfrom torch import from_numpy",
     "def embed(self, px):\n    arr = self.proj(px).detach().numpy()  # <-\n    return from_numpy(arr)  # <-",
     "def embed(self, px):\n    out = self.proj(px)\n    self.stats = from_numpy(out.detach().numpy())\n    return out", DT),
    ("tolist_rewrap", "",
     "def embed(self, px):\n    values = self.proj(px).tolist()  # <-\n    return torch.tensor(values)  # <-",
     "def embed(self, px):\n    out = self.proj(px)\n    self.values = torch.tensor(out.tolist())\n    return out", DT),
]


def _source(imports: str, method: str) -> str:
    return TEMPLATE.format(imports=imports, method=textwrap.indent(method, "    "))


def _write(tmp_path: Path, name: str, imports: str, method: str) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(_source(imports, method), encoding="utf-8")
    return path


def _marked_lines(text: str) -> set[int]:
    return {number for number, line in enumerate(text.splitlines(), 1) if line.rstrip().endswith("# <-")}


@pytest.mark.parametrize("name,imports,bug,healthy,kind", ROWS, ids=[row[0] for row in ROWS])
class TestGradBreakingForms:
    def test_bug_warns_on_the_marked_lines(self, tmp_path, name, imports, bug, healthy, kind) -> None:
        path = _write(tmp_path, name, imports, bug)
        expected = {(line, kind) for line in _marked_lines(path.read_text())}
        assert expected, "the row marks no line"
        warnings = {(f.line, f.kind) for f in lint_file(path) if f.severity == "warning"}
        assert warnings == expected, path.read_text()
        assert main([str(path)]) == 1

    def test_healthy_twin_has_no_warning(self, tmp_path, name, imports, bug, healthy, kind, capsys) -> None:
        path = _write(tmp_path, name + "_twin", imports, healthy)
        assert "# <-" not in healthy
        warnings = [f.to_text() for f in lint_file(path) if f.severity == "warning"]
        assert warnings == [], path.read_text()
        assert main([str(path)]) == 0, capsys.readouterr()


def test_code_not_reached_from_forward_is_not_reported(tmp_path) -> None:
    # The method holds the bug, but forward never calls it (an eval helper): nothing to say.
    path = _write(tmp_path, "unreached", "", "def embed(self, px):\n    return self.proj(px)\n\n"
                  "def evaluate(self, px):\n    with torch.no_grad():\n        return self.proj(px)")
    assert lint_file(path) == []


def test_every_row_parses_and_twins_differ() -> None:
    import ast

    for name, imports, bug, healthy, _ in ROWS:
        ast.parse(_source(imports, bug), name)
        ast.parse(_source(imports, healthy), name)
        assert bug.replace("  # <-", "") != healthy, name


def _proj_line_in_embed(text: str) -> tuple[int, int] | None:
    """(line of ``def embed``, line of its ``self.proj(`` call), when embed itself calls proj."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines, 1) if line.strip().startswith("def embed("))
    for number in range(start + 1, len(lines) + 1):
        line = lines[number - 1]
        if line.strip().startswith("def "):
            return None
        if "self.proj(" in line:
            return start, number
    return None


RUNTIME_ROWS = [row for row in ROWS if row[4] == GD and _proj_line_in_embed(_source(row[1], row[2]))]


@pytest.mark.parametrize("name,imports,bug,healthy,kind", RUNTIME_ROWS, ids=[row[0] for row in RUNTIME_ROWS])
def test_runtime_locator_names_the_same_statement(tmp_path, name, imports, bug, healthy, kind) -> None:
    # diagnostics.source.scan_function is what the engine asks when grad is off at a live
    # frame: at the proj call it must name the statement lint marks, under every spelling.
    from diagnostics.source import scan_function

    path = _write(tmp_path, name, imports, bug)
    text = path.read_text()
    def_line, proj_line = _proj_line_in_embed(text)
    site = scan_function(str(path), "embed", def_line, proj_line)
    assert site is not None and site.location.line in _marked_lines(text), (site, text)
