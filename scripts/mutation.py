"""Mutation testing with cosmic-ray (PyPI: cosmic-ray), one module at a time with the fast tests
that concern it. Slow (a pytest run per mutant): not part of CI. Results: docs/testing.md.

    python scripts/mutation.py                      # every module of MODULES below
    python scripts/mutation.py hakubooru/rng.py     # some of them
    python scripts/mutation.py --list               # the modules, their tests and line ranges
    python scripts/mutation.py --work W --recheck   # run W's survivors again with today's tests

cosmic-ray writes each mutant into the source file, so the run happens in a copy of the working
tree (under --work, default a temporary folder); your checkout is never modified. The operators
are a subset of cosmic-ray's "core" set, the small realistic bugs: off-by-one comparisons
(< vs <=), == vs !=, + vs -, * vs /, and/or, not added or dropped, True/False, numbers ±1,
loops run zero times, exceptions not caught, break/continue swapped. Each module's score and its
surviving mutants (file, line, operator) are printed and written to --work/<module>.survivors.txt.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# module -> (tests run against each mutant, line range to mutate or None for the whole file)
SLOW = "not independent_of_row_order and not reads_back_with_datasets"  # subprocess / datasets import
MODULES = {
    "hakubooru/rng.py": (f"tests/hakubooru/test_rng.py tests/hakubooru/test_selector.py tests/trainer/data/test_augment.py -k '{SLOW}'", None),
    "hakubooru/tagrules.py": (f"tests/hakubooru/test_tagrules.py tests/hakubooru/test_captioner.py -k '{SLOW}'", None),
    "hakubooru/quality.py": (f"tests/hakubooru/test_caption_quality.py tests/hakubooru/test_captioner.py -k '{SLOW}'", None),
    "hakubooru/selector.py": (f"tests/hakubooru/test_selector.py -k '{SLOW}'", None),
    "trainers/lokr/data/bucketing.py": ("tests/trainer/data/test_bucketing.py", None),
    "trainers/lokr/data/integrity.py": ("tests/trainer/data/test_integrity.py -k 'not training'", None),
    "hakubooru/captioner.py": (f"tests/hakubooru/test_captioner.py tests/hakubooru/test_captioner_edges.py tests/hakubooru/test_caption_quality.py -k '{SLOW}'", None),
    # the step functions of train.py (lr_factor .. diffusion_loss), with their unit tests
    "trainers/lokr/train.py": ("tests/trainer/test_train.py -k 'min_snr or draws or warmup or mse or timesteps'",
                               "step-functions"),
    "trainers/lokr/optim/schedule.py": ("tests/trainer/test_schedule_optim.py -k 'by_hand'", None),
    "trainers/lokr/sdxl/prediction.py": ("tests/trainer/sdxl/test_prediction.py", None),
    "hakubooru/buildlock.py": ("tests/hakubooru/test_build_robustness.py -k 'lock or temporar or second_build'", None),
    # the rest of hakubooru/
    "hakubooru/db.py": ("tests/hakubooru/test_db.py", None),
    "hakubooru/builder.py": ("tests/hakubooru/test_builder.py", None),
    "hakubooru/manifest.py": ("tests/hakubooru/test_builder.py -k 'manifest or rerun or refus or other_inputs or parts'", None),
    "hakubooru/shardwriter.py": ("tests/hakubooru/test_shardwriter.py tests/hakubooru/test_builder.py -k 'test_shardwriter or every_sample or offsets'", None),
    "hakubooru/sources.py": ("tests/hakubooru/test_sources.py", None),
    "hakubooru/images.py": ("tests/hakubooru/test_images.py tests/hakubooru/test_to_rgb.py tests/hakubooru/test_orientation.py", None),
    "hakubooru/hf.py": ("tests/hakubooru/test_card.py", None),
    "hakubooru/card.py": ("tests/hakubooru/test_card.py", None),
    "hakubooru/cli.py": ("tests/hakubooru/test_cli.py tests/hakubooru/test_selector.py -k 'select_command or help or option or overwrite or shard_file'", None),
    "hakubooru/errors.py": ("tests/hakubooru/test_cli.py tests/hakubooru/test_build_robustness.py -k 'full_disk or lock or one_line or named'", None),
    "hakubooru/clip_tokenizer.py": ("tests/hakubooru/test_clip_tokenizer.py", None),
    "hakubooru/export.py": ("tests/hakubooru/test_export.py", None),
    "hakubooru/report.py": ("tests/hakubooru/test_report.py -k 'not screenshot'", None),
    "hakubooru/report_html.py": ("tests/hakubooru/test_report.py -k 'not screenshot'", None),
    "hakubooru/report_scan.py": ("tests/hakubooru/test_report.py -k 'not screenshot'", None),
    "hakubooru/htmlpage.py": ("tests/hakubooru/test_report.py tests/trainer/observe/test_curves.py -k 'not screenshot'", None),
    "hakubooru/shardfolder.py": ("tests/hakubooru/test_wdsindex.py tests/hakubooru/test_export.py -k 'refus or shard_file'", None),
    "hakubooru/wdsindex.py": ("tests/hakubooru/test_wdsindex.py", None),
    "hakubooru/commands/build.py": ("tests/hakubooru/test_builder.py tests/hakubooru/test_cli.py", None),
    "hakubooru/commands/caption.py": ("tests/hakubooru/test_captioner.py tests/hakubooru/test_cli.py", None),
    "hakubooru/commands/caption_style.py": ("tests/hakubooru/test_caption_style.py", None),
    "hakubooru/commands/export.py": ("tests/hakubooru/test_export.py", None),
    "hakubooru/commands/index.py": ("tests/hakubooru/test_wdsindex.py", None),
    "hakubooru/commands/report.py": ("tests/hakubooru/test_report.py -k 'not screenshot'", None),
    "hakubooru/commands/select.py": ("tests/hakubooru/test_selector.py tests/hakubooru/test_cli.py", None),
    "hakubooru/commands/synth.py": ("tests/hakubooru/test_synth.py -k 'command_line or bad_arguments'", None),
    "hakubooru/synth/database.py": ("tests/hakubooru/test_synth.py", None),
    "hakubooru/synth/posts.py": ("tests/hakubooru/test_synth.py", None),
    "hakubooru/synth/tags.py": ("tests/hakubooru/test_synth.py", None),
    "hakubooru/synth/images.py": ("tests/hakubooru/test_synth.py", None),
    "hakubooru/synth/archives.py": ("tests/hakubooru/test_synth.py", None),
    "hakubooru/synth/demo.py": ("tests/hakubooru/test_synth.py", None),
    "hakubooru/synth/subset.py": ("tests/hakubooru/test_synth.py", None),
    # the rest of trainers/lokr/
    "trainers/lokr/data/augment.py": ("tests/trainer/data/test_augment.py tests/hakubooru/test_wdsindex.py -k 'augment or keep'", None),
    "trainers/lokr/data/index.py": ("tests/trainer/data/test_data.py tests/trainer/data/test_integrity.py -k 'index or folder or manifest'", None),
    "trainers/lokr/data/batches.py": ("tests/trainer/data/test_data.py", None),
    "trainers/lokr/config.py": ("tests/trainer/test_config.py", None),
    "trainers/lokr/__main__.py": ("tests/trainer/test_config.py -k 'cli or resume'", None),
    "trainers/lokr/sdxl/text.py": ("tests/trainer/sdxl/test_text.py", None),
    "trainers/lokr/sdxl/model.py": ("tests/trainer/sdxl/test_models.py", None),
    "trainers/lokr/sdxl/loading.py": ("tests/trainer/sdxl/test_models.py tests/trainer/sdxl/test_real_topology.py -k 'round_trip or missing or folder or load'", None),
    "trainers/lokr/sdxl/ldm.py": ("tests/trainer/sdxl/test_models.py tests/trainer/network/test_lokr_file.py -k 'single_file or merge_cli'", None),
    "trainers/lokr/sdxl/fake.py": ("tests/trainer/sdxl/test_fake_sdxl.py tests/trainer/sdxl/test_real_topology.py -k 'not train_from'", None),
    "trainers/lokr/network/lokr.py": ("tests/trainer/network/test_network.py tests/trainer/test_bypass.py", None),
    "trainers/lokr/network/naming.py": ("tests/trainer/network/test_lokr_file.py -k 'epsilon or diffusers_names or single_file or both_namings'", None),
    "trainers/lokr/network/convert.py": ("tests/trainer/network/test_lokr_file.py -k 'convert or generic or fresh_process'", None),
    "trainers/lokr/network/metadata.py": ("tests/trainer/network/test_lokr_file.py -k 'metadata or byte_identical'", None),
    "trainers/lokr/safetensors_file.py": ("tests/trainer/network/test_lokr_file.py tests/trainer/test_state.py -k 'metadata or byte_identical or state or write'", None),
    "trainers/lokr/state.py": ("tests/trainer/test_state.py tests/trainer/test_resume.py", None),
    "trainers/lokr/network/merge.py": ("tests/trainer/network/test_merge.py", None),
    "trainers/lokr/data/vae_encode.py": ("tests/trainer/data/test_latents.py", None),
    "trainers/lokr/data/latent_cache_build.py": ("tests/trainer/data/test_latent_cache.py -k 'not gpu_step'", None),
    "trainers/lokr/data/latent_cache.py": ("tests/trainer/data/test_latent_cache.py -k 'not gpu_step'", None),
    "trainers/lokr/distributed.py": ("tests/trainer/test_ddp.py", None),
    "trainers/lokr/observe/dryrun.py": ("tests/trainer/observe/test_dryrun.py", None),
    "trainers/lokr/observe/memory.py": ("tests/trainer/observe/test_memory.py", None),
    "trainers/lokr/observe/sampling.py": ("tests/trainer/observe/test_sampling.py", None),
    "trainers/lokr/observe/report.py": ("tests/trainer/observe/test_curves.py", None),
    "trainers/lokr/observe/dataset_report.py": ("tests/trainer/observe/test_dataset_report.py", None),
    "trainers/lokr/observe/tblog.py": ("tests/trainer/observe/test_tblog.py", None),
    "trainers/lokr/observe/eval_characters.py": ("tests/trainer/observe/test_eval_characters.py tests/trainer/observe/test_eval.py", None),
    "trainers/lokr/observe/eval_run.py": ("tests/trainer/observe/test_eval.py", None),
    "trainers/lokr/observe/eval.py": ("tests/trainer/observe/test_eval.py", None),
    "trainers/lokr/observe/ccip.py": ("tests/trainer/observe/test_ccip.py tests/trainer/observe/test_eval.py", None),
    # train.py beyond the step functions: the loop (its tests train the tiny model)
    "trainers/lokr/train.py::loop": ("tests/trainer/test_train.py tests/trainer/test_state.py", "loop"),
}
KEEP = {  # operator families and the members kept (the rest would multiply mutants, not bugs)
    "ReplaceBinaryOperator": {"Add_Sub", "Sub_Add", "Mul_Div", "Div_Mul", "FloorDiv_Div",
                              "Mod_FloorDiv", "BitAnd_BitOr", "BitOr_BitAnd"},
    "ReplaceComparisonOperator": {"Eq_NotEq", "NotEq_Eq", "Lt_LtE", "LtE_Lt", "Gt_GtE", "GtE_Gt",
                                  "Is_IsNot", "IsNot_Is", "In_NotIn", "NotIn_In"},
    "ReplaceUnaryOperator": {"Delete_Not", "Delete_USub"},
}
DROP = ("core/VariableReplacer", "core/VariableInserter", "core/RemoveDecorator")


def excluded_operators() -> list[str]:
    """Regular expressions of the cosmic-ray operators this run leaves out."""
    rules = [f"^{name}$" for name in DROP]
    for family, kept in KEEP.items():
        rules.append(f"^core/{family}_(?!({'|'.join(sorted(kept))})$).*$")
    return rules


def step_function_lines(path: Path) -> tuple[int, int]:
    """train.py: from ``def lr_factor`` to the end of ``diffusion_loss``."""
    lines = path.read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("def lr_factor"))
    end = next(i for i, ln in enumerate(lines) if ln.startswith("def diffusion_loss"))
    end = next(i for i in range(end + 1, len(lines)) if lines[i].startswith(("def ", "class ", "# ---")))
    return start + 1, end


def copy_tree(dest: Path) -> None:
    """The working tree's files (tracked and untracked, not ignored) into ``dest``."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def session_stem(module: str) -> str:
    """File stem of a MODULES entry's session ("trainers/lokr/train.py::loop" -> trainers_lokr_train_loop)."""
    return module.replace("::", "_").replace("/", "_").replace(".py", "")


def write_config(work: Path, module: str, tests: str, timeout: float) -> Path:
    """The cosmic-ray config of one module's session."""
    config = work / f"{session_stem(module)}.toml"
    config.write_text(
        "[cosmic-ray]\n"
        f"module-path = {json.dumps(module.split('::')[0])}\n"
        f"timeout = {timeout}\n"
        "excluded-modules = []\n"
        f"test-command = {json.dumps(f'{sys.executable} -m pytest -x -q -p no:cacheprovider {tests}')}\n"
        "[cosmic-ray.distributor]\nname = \"local\"\n"
        "[cosmic-ray.filters.operators-filter]\n"
        f"exclude-operators = {json.dumps(excluded_operators())}\n")
    return config


def run_module(work: Path, module: str, tests: str, lines, timeout: float, sample: int) -> dict:
    """Init, filter and execute one module's session; returns its counts and survivors."""
    stem = session_stem(module)
    config, session = write_config(work, module, tests, timeout), work / f"{stem}.sqlite"
    python = sys.executable
    env = dict(os.environ, PYTHONPATH=str(work), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cr = Path(python).with_name("cosmic-ray")
    session.unlink(missing_ok=True)
    baseline(work, module, tests, env)
    subprocess.run([str(cr), "init", str(config), str(session)], cwd=work, env=env, check=True)
    subprocess.run([str(Path(python).with_name("cr-filter-operators")), str(session), str(config)],
                   cwd=work, env=env, check=True)
    with sqlite3.connect(session) as db:
        if lines in ("step-functions", "loop"):  # train.py: its step functions, or everything else
            lo, hi = step_function_lines(work / module.split("::")[0])
            outside = "start_pos_row < ? OR start_pos_row > ?" if lines == "step-functions" else \
                "start_pos_row BETWEEN ? AND ?"
            db.execute("INSERT OR IGNORE INTO work_results (worker_outcome, output, job_id) "
                       f"SELECT 'SKIPPED', 'outside the line range', job_id FROM mutation_specs WHERE {outside}",
                       (lo, hi))
        if sample:  # every k-th remaining mutant in (line, operator, occurrence) order
            left = [r[0] for r in db.execute(
                "SELECT s.job_id FROM mutation_specs s LEFT JOIN work_results r ON r.job_id = s.job_id "
                "WHERE r.job_id IS NULL ORDER BY s.start_pos_row, s.start_pos_col, s.operator_name, "
                "s.occurrence")]
            step = max(1, -(-len(left) // sample))
            db.executemany("INSERT INTO work_results (worker_outcome, output, job_id) "
                           "VALUES ('SKIPPED', 'not in the sample', ?)",
                           [(j,) for i, j in enumerate(left) if i % step])
    subprocess.run([str(cr), "exec", str(config), str(session)], cwd=work, env=env, check=True)
    return summarize(session, work / f"{stem}.survivors.txt")


def baseline(work: Path, module: str, tests: str, env: dict) -> float:
    """Run ``module``'s tests once on the unmutated copy: they must pass (a failing or empty test
    selection would count every mutant as killed). Returns their wall seconds."""
    start = time.perf_counter()
    run = subprocess.run(f"{sys.executable} -m pytest -x -q -p no:cacheprovider {tests}", shell=True,
                         cwd=work, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        sys.exit(f"error: {module}'s tests fail before any mutation (exit {run.returncode}); "
                 f"fix them or MODULES first:\n{run.stdout[-1500:]}")
    print(f"{module}: baseline {seconds:.1f} s ({tests})", flush=True)
    return seconds


def recheck(work: Path, module: str, tests: str, timeout: float) -> dict | None:
    """Run the survivors of ``module``'s session in ``work`` again with ``tests`` (after today's
    tree was copied in); None if the module has no session there."""
    session = work / f"{session_stem(module)}.sqlite"
    if not session.is_file():
        return None
    config = write_config(work, module, tests, timeout)
    with sqlite3.connect(session) as db:
        db.execute("DELETE FROM work_results WHERE test_outcome = 'SURVIVED'")
    env = dict(os.environ, PYTHONPATH=str(work), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    subprocess.run([str(Path(sys.executable).with_name("cosmic-ray")), "exec", str(config), str(session)],
                   cwd=work, env=env, check=True)
    return summarize(session, work / f"{session_stem(module)}.survivors.txt")


def summarize(session: Path, survivors_file: Path) -> dict:
    """Counts by outcome, and the survivors (line, operator, occurrence) written to a file."""
    with sqlite3.connect(session) as db:
        rows = db.execute(
            "SELECT s.module_path, s.start_pos_row, s.operator_name, s.occurrence, r.test_outcome, r.output "
            "FROM mutation_specs s JOIN work_results r ON r.job_id = s.job_id "
            "WHERE r.worker_outcome != 'SKIPPED' ORDER BY s.module_path, s.start_pos_row").fetchall()
    counts = {"killed": 0, "survived": 0, "incompetent": 0}
    survivors = []
    for module, line, op, occ, outcome, output in rows:
        key = {"KILLED": "killed", "SURVIVED": "survived"}.get(str(outcome).split(".")[-1].upper(),
                                                                "incompetent")
        counts[key] += 1
        if key == "survived":
            survivors.append(f"{module}:{line} {op} #{occ}")
    survivors_file.write_text("".join(s + "\n" for s in survivors))
    counts["survivors"] = survivors
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("modules", nargs="*", help="modules of MODULES (default: all)")
    p.add_argument("--work", type=Path, help="where the copy and the sessions go (default: a temp folder)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per mutant's test run")
    p.add_argument("--sample", type=int, default=0,
                   help="run at most about this many mutants per module (every k-th); 0 = all")
    p.add_argument("--recheck", action="store_true",
                   help="with --work: copy today's tree in and run the survivors of its sessions again")
    p.add_argument("--list", action="store_true")
    args = p.parse_args()
    if args.list:
        for module, (tests, lines) in MODULES.items():
            print(f"{module}: {tests}" + (f" (lines: {lines})" if lines else ""))
        return
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        sys.exit(f"error: not in MODULES: {', '.join(unknown)} (see --list)")
    if args.recheck and not args.work:
        sys.exit("error: --recheck needs the --work folder of an earlier run")
    work = args.work or Path(tempfile.mkdtemp(prefix="hakubooru-mutation-"))
    work.mkdir(parents=True, exist_ok=True)
    copy_tree(work)
    total = {"killed": 0, "survived": 0, "incompetent": 0}
    for module in args.modules or list(MODULES):
        tests, lines = MODULES[module]
        if args.recheck:
            counts = recheck(work, module, tests, args.timeout)
            if counts is None:
                continue
        else:
            counts = run_module(work, module, tests, lines, args.timeout, args.sample)
        for k in total:
            total[k] += counts[k]
        scored = counts["killed"] + counts["survived"]
        print(f"{module}: {counts['killed']} killed, {counts['survived']} survived, "
              f"{counts['incompetent']} incompetent/timeout; score {counts['killed'] / max(scored, 1):.1%}",
              flush=True)
        for s in counts["survivors"]:
            print(f"  survived: {s}")
    scored = total["killed"] + total["survived"]
    print(f"all: {total['killed']} killed of {scored} ({total['killed'] / max(scored, 1):.1%}); "
          f"{total['incompetent']} incompetent/timeout; sessions in {work}")


if __name__ == "__main__":
    main()
