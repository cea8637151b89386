"""Turn saved pytest-benchmark JSON into ``benchmarks/RESULTS.md`` (tables) and PNG plots.

    python benchmarks/report.py                   # results/cpu.json (+ results/gpu.json if present) -> RESULTS.md
    python benchmarks/report.py --gpu-json out/bench-gpu.json --gpu-only --out-md out/RESULTS-gpu.md

Reads only JSON; runs nothing. Every ratio shown was measured side by side in one process (see
the benchmark files); the renderer's speed-up is computed here from the medians of its two
renderers, which ran one after the other in the same process.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MFU_GOAL = 0.45
EXIT_OK, EXIT_NO_DATA = 0, 2

GPU_NOT_RUN = (
    "**Not run in this session: no device lent.** The script is prepared: "
    "`python benchmarks/gpu_suite.py` on one H100/H200 (results under `$OUT`, default `./out`; "
    "`--smoke` runs the same code on CPU at tiny scale)."
)
GPU_PLAN = """What it runs (budget ≤ 8 min on one H100; expected ≈ 3-4 min: ~1 min to build Qwen3-8B + full
DeepEncoder + proj on `meta` and give them random bf16 weights on the GPU, ~2-3 min of steps):

1. `pytest -m gpu tests` (regression tests marked `gpu`; 150 s limit).
2. `pytest -m gpu benchmarks` (300 s limit), seed-scale shapes, 2,048 recent tokens + 256 memory
   tokens per page, AdamW on `proj`, 2 warm-up + 5 timed steps per case:
   * `ours` (frozen parts in eval, encoder under `no_grad`, SDPA), 1 and 4 pages per row;
     `ours+ckpt` (non-reentrant activation checkpointing), 4 pages; `user` (encoder input forced
     to require grad, frozen modules in train mode, eager attention, no checkpointing), 1 page.
     Each tries batch 8 → 4 → 2 → 1 and times the largest that fits in 80 GiB
     (`torch.cuda.set_per_process_memory_fraction`, so an H200 answers the same question).
   * `user` vs `ours` at batch 1 (1 and 4 pages), alternating step by step: step-time and
     peak-memory ratios.
   Reported: tokens/s, samples/s, `torch.cuda.max_memory_allocated`, MFU against 989 TFLOP/s
   dense bf16 (H100 SXM / H200) with the goal ≥ 45 %, the largest batch that fits.
3. Useful FLOPs per step are counted with `FlopCounterMode` on a `meta` twin of the model: LLM
   forward + input-gradient backward (= 4 · N_matmul per token, N_matmul = 6.95 B) plus causal
   attention (FlopCounterMode's full L×L count halved), encoder forward (1.14 TFLOP per 1024-px
   page), proj forward + weight gradient. Checkpoint recomputation and the user's encoder
   backward are not useful work, so they lower MFU."""


# ----------------------------------------------------------------------------- loading


def load(path: Path | None) -> dict[str, Any] | None:
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def by_file(data: dict[str, Any] | None) -> dict[str, list[dict[str, Any]]]:
    """Benchmarks keyed by the file that defined them (``test_bench_render`` ...)."""
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for bench in (data or {}).get("benchmarks", []):
        stem = Path(bench["fullname"].split("::")[0]).stem
        out[stem].append(bench)
    return out


# ----------------------------------------------------------------------------- formatting


def ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:,.1f} ms"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{int(n):,} B"


def gib(x: float | None) -> str:
    return "—" if x is None else f"{x:,.1f} GiB"


def ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- sections


def machine_section(data: dict[str, Any], run_info: dict[str, Any] | None) -> str:
    info = data.get("machine_info", {})
    facts = info.get("ocrmem", {})
    rows = [
        ["date", data.get("datetime", "—")],
        ["CPU", facts.get("cpu_model") or info.get("cpu", {}).get("brand_raw", "—")],
        ["cores (os.cpu_count)", facts.get("cpu_cores", "—")],
        ["torch threads", facts.get("torch_threads", "—")],
        ["torch", facts.get("torch", "—")],
        ["transformers", facts.get("transformers", "—")],
        ["python", facts.get("python", info.get("python_version", "—"))],
    ]
    if facts.get("gpu_name"):
        rows.append(["GPU", f"{facts['gpu_name']} ({facts.get('gpu_memory_gib')} GiB, CUDA {facts.get('cuda')})"])
    if run_info:
        rows.append(["suite wall time", f"{run_info['seconds']:.0f} s (`{run_info['command']}`, pytest rc {run_info['pytest_rc']})"])
    return table(["", ""], rows)


def measured_line(data: dict[str, Any], run_info: dict[str, Any] | None) -> str:
    """One sentence for the top of the report: when, where and with what the CPU numbers were measured."""
    info = data.get("machine_info", {})
    facts = info.get("ocrmem", {})
    when = str(data.get("datetime", "an unrecorded date"))
    when = when[:16].replace("T", " ") + " UTC" if len(when) >= 16 and when[10] == "T" else when
    cpu = facts.get("cpu_model") or info.get("cpu", {}).get("brand_raw", "an unrecorded CPU")
    command = f" with `{run_info['command']}`" if run_info else ""
    return (f"**Measured {when} on {cpu}, {facts.get('cpu_cores', '?')} cores "
            f"({facts.get('torch_threads', '?')} torch threads), torch {facts.get('torch', '?')}, transformers "
            f"{facts.get('transformers', '?')}, python {facts.get('python', info.get('python_version', '?'))}{command}.**")


def render_section(benches: list[dict[str, Any]]) -> tuple[str, list[tuple[str, float]]]:
    groups: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for bench in benches:
        groups[bench["group"] or "render"][bench["params"].get("kind", bench["name"])] = bench
    rows, ratios = [], []
    for group, kinds in sorted(groups.items()):
        base = kinds.get("baseline")
        for kind, bench in sorted(kinds.items()):
            s = bench["stats"]
            speedup = base["stats"]["median"] / s["median"] if base else None
            rows.append([group, kind, ms(s["median"]), ms(s["min"]), s["rounds"], ratio(speedup)])
        if base and "atlas" in kinds:
            language = group.split(",")[0]
            ratios.append((f"render {language}: atlas / ImageDraw time", kinds["atlas"]["stats"]["median"] / base["stats"]["median"]))
    text = table(["page", "renderer", "median", "min", "rounds", "speed-up vs baseline (median)"], rows)
    return text, ratios


def train_step_section(benches: list[dict[str, Any]]) -> tuple[str, list[tuple[str, float]]]:
    rows, ratios = [], []
    for bench in sorted(benches, key=lambda b: b["extra_info"].get("batch_size", 0)):
        e = bench["extra_info"]
        rows.append([
            e["batch_size"], e["pages"], ms(e["fast_median_s"]), ms(e.get("fast_precollated_median_s")),
            ms(e["seed_median_s"]), ratio(e["ratio_seed_vs_fast"]), ratio(e.get("ratio_seed_vs_fast_precollated")),
            e["rounds"],
        ])
        ratios.append((f"train step B={e['batch_size']}: seed / fast", e["ratio_seed_vs_fast"]))
        if "ratio_seed_vs_fast_precollated" in e:
            ratios.append((f"train step B={e['batch_size']}: seed / fast (pre-collated)", e["ratio_seed_vs_fast_precollated"]))
    text = table(
        ["batch", "pages", "fast: collate+fwd+bwd", "fast: fwd+bwd (pre-collated)", "seed: model renders",
         "seed / fast", "seed / pre-collated", "rounds"],
        rows,
    )
    return text, ratios


def memory_section(benches: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    rows, bars = [], []
    for bench in benches:
        e = bench["extra_info"]
        rows.append([
            "tracked (`pixel_values.requires_grad_()`)" if e["encoder_tracked"] else "untracked (ours, `no_grad`)",
            e["checkpointing"] + ("" if e["checkpointing"] == "off" or e["llm_train_mode"] else " (inactive: LLM in eval)"),
            e["saved_tensors"], fmt_bytes(e["activations_bytes"]), fmt_bytes(e["activations_unique_bytes"]),
            fmt_bytes(e["checkpoint_inputs_unique_bytes"]), fmt_bytes(e["weights_unique_bytes"]),
            fmt_bytes(e["held_bytes"]), ratio(e["ratio_held_vs_baseline"]),
        ])
        bars.append(e)
    text = table(
        ["encoder", "LLM checkpointing", "saved tensors", "activations (sum)", "activations (unique)",
         "checkpoint inputs", "frozen weights referenced", "held = unique act. + ckpt inputs", "held vs ours/off"],
        rows,
    )
    held = {(e["encoder_tracked"], e["checkpointing"]): e["held_bytes"] for e in bars}
    notes = []
    for ckpt in ("off", "non-reentrant"):
        if (True, ckpt) in held and (False, ckpt) in held:
            extra = held[(True, ckpt)] - held[(False, ckpt)]
            notes.append(f"* checkpointing {ckpt}: tracking the frozen encoder adds {fmt_bytes(extra)}, "
                         f"{100 * extra / held[(True, ckpt)]:.0f} % of what the step holds.")
    if ("off" in {c for _, c in held}) and (False, "non-reentrant") in held and (False, "off") in held:
        saved = held[(False, "off")] - held[(False, "non-reentrant")]
        notes.append(f"* untracked encoder: non-reentrant checkpointing holds {fmt_bytes(saved)} less "
                     f"({held[(False, 'non-reentrant')] / held[(False, 'off')]:.2f}× of off); at tiny scale what "
                     "remains is mostly the float32 logits kept for the loss.")
    return text + "\n\n" + "\n".join(notes), bars


def generic_section(benches: list[dict[str, Any]]) -> tuple[str, list[tuple[str, float]]]:
    """Benchmarks another file owns (e.g. diagnostics overhead): median plus every ratio-like extra."""
    rows, ratios = [], []
    for bench in benches:
        extras = {k: v for k, v in bench.get("extra_info", {}).items()
                  if isinstance(v, (int, float, str, bool)) and any(w in k for w in ("ratio", "overhead", "target", "slowdown"))}
        rows.append([bench["name"], bench.get("group") or "—", ms(bench["stats"]["median"]),
                     ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in extras.items()) or "—"])
        for key, value in extras.items():
            if isinstance(value, float) and ("ratio" in key or "overhead" in key) and "target" not in key:
                ratios.append((f"{bench['name']}: {key}", value))
    return table(["benchmark", "group", "median", "ratios / targets (extra_info)"], rows), ratios


def gpu_section(benches: list[dict[str, Any]]) -> tuple[str, list[tuple[str, float]], list[tuple[str, float]]]:
    step_rows, pair_rows, ratios, mfus = [], [], [], []
    for bench in benches:
        e = bench["extra_info"]
        if bench["name"].startswith("test_gpu_step"):
            if e.get("oom"):
                step_rows.append([e["config"], e["pages_per_row"], "OOM at " + ", ".join(map(str, e["oom_batches"])),
                                  "—", "—", "—", "—", "—", "—"])
                continue
            label = f"{e['config']}, {e['pages_per_row']} p, B={e['batch_size']}"
            mfus.append((label, e.get("mfu") or 0.0))
            step_rows.append([
                e["config"], e["pages_per_row"], f"{e['batch_size']} (OOM: {', '.join(map(str, e['oom_batches'])) or 'none'})",
                e["seq_len"], ms(e["step_s"]), f"{e['tokens_per_s']:,.0f}", f"{e['samples_per_s']:.2f}",
                gib(e.get("peak_memory_gib")),
                pct(e.get("mfu")) + ("" if e.get("mfu") is None else (" ✓" if e["mfu"] >= MFU_GOAL else " < 45 %")),
            ])
        elif bench["name"].startswith("test_gpu_user_vs_ours"):
            ours, user = e.get("ours") or {}, e.get("user") or {}
            if user.get("oom"):
                pair_rows.append([e["pages_per_row"], ms(ours.get("step_s")), "OOM at batch 1", "—",
                                  gib(ours.get("peak_memory_gib")), "—", "—", pct(ours.get("mfu")), "—"])
                continue
            pair_rows.append([
                e["pages_per_row"], ms(ours.get("step_s")), ms(user.get("step_s")), ratio(e.get("ratio_user_vs_ours")),
                gib(ours.get("peak_memory_gib")), gib(user.get("peak_memory_gib")),
                ratio(e.get("ratio_peak_memory_user_vs_ours")), pct(ours.get("mfu")), pct(user.get("mfu")),
            ])
            if e.get("ratio_user_vs_ours"):
                ratios.append((f"GPU B=1, {e['pages_per_row']} p: user / ours step time", e["ratio_user_vs_ours"]))
    parts = []
    if step_rows:
        parts.append("Largest batch that fits (tried 8 → 4 → 2 → 1, 80 GiB cap) and its throughput:\n\n" + table(
            ["config", "pages/row", "batch (OOM at)", "seq len", "step", "tokens/s", "samples/s", "peak memory",
             f"MFU (goal ≥ {MFU_GOAL:.0%})"], step_rows))
    if pair_rows:
        parts.append("The user's configuration vs ours, batch 1, alternating step by step:\n\n" + table(
            ["pages/row", "ours step", "user step", "user / ours", "ours peak", "user peak", "peak ratio", "ours MFU", "user MFU"],
            pair_rows))
    return "\n\n".join(parts), ratios, mfus


# ----------------------------------------------------------------------------- plots


def plot_ratios(ratios: list[tuple[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.45 * len(ratios) + 1.2))
    labels = [label for label, _ in ratios]
    values = [value for _, value in ratios]
    ax.barh(range(len(values)), values, color=["tab:red" if v > 1 else "tab:green" for v in values])
    ax.set_yticks(range(len(values)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.2f}×", va="center", fontsize=8)
    ax.set_xlabel("time ratio (candidate / baseline, same process; < 1 = faster)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_saved_bytes(bars: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{'tracked' if e['encoder_tracked'] else 'untracked'}\nckpt {e['checkpointing']}" for e in bars]
    act = [e["activations_unique_bytes"] / 2**20 for e in bars]
    ckpt = [e["checkpoint_inputs_unique_bytes"] / 2**20 for e in bars]
    weights = [e["weights_unique_bytes"] / 2**20 for e in bars]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = list(range(len(bars)))
    held_x = [i - 0.12 for i in x]
    ax.bar(held_x, act, width=0.5, label="activations (unique)", color="tab:orange")
    ax.bar(held_x, ckpt, width=0.5, bottom=act, label="checkpoint inputs", color="tab:blue")
    ax.bar([i + 0.26 for i in x], weights, width=0.2, label="frozen weights referenced (exist anyway)",
           color="lightgray")
    for i, e in enumerate(bars):
        ax.text(held_x[i], act[i] + ckpt[i], f"{e['held_bytes'] / 2**20:.2f} MiB\n({e['ratio_held_vs_baseline']:.2f}×)",
                ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 1.3 * max(a + c for a, c in zip(act, ckpt)))
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("MiB held for backward per step")
    ax.set_title("Bytes saved for backward, tiny preset (4 rows, 1 page each)")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_mfu(mfus: list[tuple[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.5 * len(mfus) + 1.2))
    ax.barh(range(len(mfus)), [100 * v for _, v in mfus], color="tab:blue")
    ax.set_yticks(range(len(mfus)), [label for label, _ in mfus], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(100 * MFU_GOAL, color="tab:red", linestyle="--", label=f"goal {MFU_GOAL:.0%}")
    ax.set_xlabel("MFU (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


KNOWN = {"test_bench_render", "test_bench_train_step", "test_bench_memory", "test_bench_gpu"}


def build_markdown(cpu: dict[str, Any] | None, gpu: dict[str, Any] | None, run_info: dict[str, Any] | None,
                   plots_dir: Path, md_dir: Path, gpu_only: bool) -> tuple[str, list[str]]:
    written: list[str] = []

    def rel(path: Path) -> str:
        try:
            return str(path.relative_to(md_dir))
        except ValueError:
            return str(path)

    lines = ["# Benchmark results", ""]
    if cpu and not gpu_only:
        lines += [measured_line(cpu, run_info), ""]
    if not gpu_only:
        lines += [
            "Regenerate: `python benchmarks/run.py --update` (CPU suite, then this report; without `--update` it",
            "writes to the ignored `benchmarks/out/`; benchmarks are not part of the default `pytest` run). GPU: `python benchmarks/gpu_suite.py`, then copy `$OUT/bench-gpu.json` to",
            "`benchmarks/results/gpu.json` and run `python benchmarks/report.py`. Raw data: `benchmarks/results/*.json`.",
            "Every ratio compares candidate and baseline measured side by side in one process.",
            "",
        ]
    all_ratios: list[tuple[str, float]] = []
    cpu_files = by_file(cpu)
    if cpu and not gpu_only:
        lines += ["## Machine (CPU suite)", "", machine_section(cpu, run_info), ""]
        if cpu_files.get("test_bench_render"):
            text, ratios = render_section(cpu_files["test_bench_render"])
            all_ratios += ratios
            lines += ["## Renderer (`test_bench_render.py`)", "",
                      "One 1,024-px page of 2,500 characters; glyph-atlas compositor vs `ImageDraw.text` per line.", "",
                      text, ""]
        if cpu_files.get("test_bench_train_step"):
            text, ratios = train_step_section(cpu_files["test_bench_train_step"])
            all_ratios += ratios
            lines += ["## Training step, tiny preset (`test_bench_train_step.py`)", "",
                      "Medians of interleaved rounds; ratios are medians of per-round ratios. *fast* = collator",
                      "renders + forward + backward in the training process; *pre-collated* = forward + backward on",
                      "a batch DataLoader workers prepared; *seed* = `model(input_ids, attention_mask, labels)`, the",
                      "model renders the history inside forward.", "", text, ""]
        if cpu_files.get("test_bench_memory"):
            text, bars = memory_section(cpu_files["test_bench_memory"])
            lines += ["## Bytes saved for backward, tiny preset (`test_bench_memory.py`)", "",
                      "Deterministic: `saved_tensors_hooks` during one forward of a 4-row fast-path batch (one page per row).",
                      "*activations (sum)* counts every packed tensor, *unique* counts a tensor saved by several ops",
                      "once. With non-reentrant checkpointing the tensors saved inside a checkpointed layer go to the",
                      "checkpoint's own hooks and are recomputed in backward (not held, not counted); the layer inputs",
                      "the checkpoint keeps are saved outside its hooks and appear as *checkpoint inputs*. Frozen",
                      "weights that `Linear` saves for its input gradient exist anyway and are listed apart.", "",
                      text, ""]
            plot = plots_dir / "saved_bytes.png"
            plot_saved_bytes(bars, plot)
            written.append(str(plot))
            lines += [f"![bytes saved for backward]({rel(plot)})", ""]
        others = {k: v for k, v in cpu_files.items() if k not in KNOWN}
        diag = others.pop("test_bench_diagnostics", None)
        lines += ["## Diagnostics overhead (`test_bench_diagnostics.py`)", ""]
        if diag:
            text, ratios = generic_section(diag)
            all_ratios += ratios
            # the target is the benchmark's own (extra_info["target_ratio"]): one place to change it
            verdicts = [f"`{b['name']}`: {b['extra_info']['ratio_diagnosis_vs_plain_step']:.2f}× — "
                        + ("meets" if b["extra_info"]["ratio_diagnosis_vs_plain_step"] <= b["extra_info"]["target_ratio"] else "misses")
                        + f" the ≤ {b['extra_info']['target_ratio']:g}× target" for b in diag
                        if "ratio_diagnosis_vs_plain_step" in b["extra_info"] and "target_ratio" in b["extra_info"]]
            lines += ["Full `grad_flow` diagnosis vs a plain forward + backward of the same model and batch, same",
                      "process, interleaved round by round (tiny preset, fast-path batch of 2); the median is of one round",
                      "(one plain step plus one diagnosis).", "", text, "", *verdicts, ""]
        else:
            lines += ["Not in this run (`benchmarks/test_bench_diagnostics.py` was not present).", ""]
        for stem, benches in sorted(others.items()):
            text, ratios = generic_section(benches)
            all_ratios += ratios
            lines += [f"## `{stem}.py`", "", text, ""]

    lines += ["## GPU (seed scale: Qwen3-8B + full DeepEncoder + proj, random bf16 weights)", ""]
    gpu_benches = by_file(gpu).get("test_bench_gpu", [])
    mfus: list[tuple[str, float]] = []
    if gpu_benches:
        facts = gpu.get("machine_info", {}).get("ocrmem", {})
        smoke = any(b["extra_info"].get("scale", "").startswith("tiny") for b in gpu_benches)
        lines += [f"Run {gpu.get('datetime', '')} on {facts.get('gpu_name', 'CPU (smoke mode)')}; torch "
                  f"{facts.get('torch')}, transformers {facts.get('transformers')}.", ""]
        if smoke:
            lines += ["**Smoke run**: tiny preset on CPU, 2 timed steps — checks the code path only; the",
                      "numbers mean nothing, MFU is not computed, batches above 2 are treated as OOM on purpose.", ""]
        text, ratios, mfus = gpu_section(gpu_benches)
        all_ratios += ratios
        lines += [text, ""]
        if mfus and any(v for _, v in mfus):
            plot = plots_dir / "gpu_mfu.png"
            plot_mfu(mfus, plot)
            written.append(str(plot))
            lines += [f"![MFU]({rel(plot)})", ""]
    else:
        lines += [GPU_NOT_RUN, ""]
    lines += [GPU_PLAN, ""]

    if all_ratios:
        plot = plots_dir / ("gpu_step_time_ratios.png" if gpu_only else "step_time_ratios.png")
        plot_ratios(all_ratios, plot, "Side-by-side time ratios")
        written.append(str(plot))
        lines += ["## Ratios at a glance", "", f"![time ratios]({rel(plot)})", ""]
    return "\n".join(lines).rstrip() + "\n", written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/report.py", description="benchmark JSON -> RESULTS.md + PNGs")
    parser.add_argument("--cpu-json", type=Path, default=RESULTS / "cpu.json")
    parser.add_argument("--gpu-json", type=Path, default=RESULTS / "gpu.json")
    parser.add_argument("--gpu-only", action="store_true", help="only the GPU section (for gpu_suite.py)")
    parser.add_argument("--out-md", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--plots-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    cpu = None if args.gpu_only else load(args.cpu_json)
    gpu = load(args.gpu_json)
    if cpu is None and gpu is None:
        print(f"no benchmark JSON found ({args.cpu_json}, {args.gpu_json}); run python benchmarks/run.py", file=sys.stderr)
        return EXIT_NO_DATA
    run_info = load(args.cpu_json.parent / "cpu-run.json") if cpu else None
    args.plots_dir.mkdir(parents=True, exist_ok=True)
    text, written = build_markdown(cpu, gpu, run_info, args.plots_dir.resolve(), args.out_md.resolve().parent, args.gpu_only)
    args.out_md.write_text(text, encoding="utf-8")
    print(f"wrote {args.out_md}" + "".join(f", {w}" for w in written))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
