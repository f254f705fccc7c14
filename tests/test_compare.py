"""compare.py: the tables hold exactly the numbers of hand-written run folders (per-task test scores, average,
chosen epoch, FLOPs and their ratio to SFT, mean ± sample std over seeds), the report mode rebuilds them, the
score curves cut at a roll-back and mark the excluded task, plots are PNG files with matplotlib and an install hint
without it, bad input is refused naming what is wrong, and sft + msft run end to end through the real train.py on
the demo mixture (a second call skips the finished run and resumes the other)."""
import json
import math
import sys
from pathlib import Path

import pytest

import compare
from demo import DEMO_ARGS

# two tasks; each run: (test scores, test avg, chosen epoch, flops train, eval)
RUNS = {
    "sft-seed20": ("sft", 20, {"a": 0.5, "b": 0.7}, 0.6, 1.0, (600, 100)),
    "sft-seed21": ("sft", 21, {"a": 0.6, "b": 0.8}, 0.7, 0.5, (600, 120)),
    "msft-seed20": ("msft", 20, {"a": 0.9, "b": 0.6}, 0.75, 1.0, (300, 60)),
    "msft-seed21": ("msft", 21, {"a": 0.8, "b": 0.8}, 0.8, 1.5, (320, 60)),
}

# mSFT with a drop: task a peaks at 0.5 in stage 1, is excluded, the model rolls back to 0.5; stage 2 goes on
MSFT_LOG = [
    {"event": "train", "step": 1, "epoch": 0.5, "loss": 2.0, "lr": 1e-5, "tokens": 10, "tok_per_s": 1.0, "real_frac": 1.0},
    {"event": "eval", "step": 0, "checkpoint": 0, "stage": 1, "epoch": 0.0, "active": ["a", "b"], "evaluated": ["a", "b"],
     "scores": {"a": 0.2, "b": 0.1}, "avg": 0.15, "snapshots_held": 1},
    {"event": "eval", "step": 1, "checkpoint": 1, "stage": 1, "epoch": 0.5, "active": ["a", "b"], "evaluated": ["a", "b"],
     "scores": {"a": 0.6, "b": 0.3}, "avg": 0.45, "snapshots_held": 2},
    {"event": "train", "step": 2, "epoch": 1.0, "loss": 1.5, "lr": 1e-5, "tokens": 10, "tok_per_s": 1.0, "real_frac": 1.0},
    {"event": "eval", "step": 2, "checkpoint": 2, "stage": 1, "epoch": 1.0, "active": ["a", "b"], "evaluated": ["a", "b"],
     "scores": {"a": 0.4, "b": 0.5}, "avg": 0.45, "snapshots_held": 2},
    {"event": "decision", "step": 2, "stage": 1, "kind": "drop", "excluded": ["a"], "rollback_epoch": 0.5},
    {"event": "train", "step": 3, "epoch": 1.5, "loss": 1.2, "lr": 1e-5, "tokens": 5, "tok_per_s": 1.0, "real_frac": 1.0},
    {"event": "eval", "step": 3, "checkpoint": 3, "stage": 2, "epoch": 1.0, "active": ["b"], "evaluated": ["a", "b"],
     "scores": {"a": 0.55, "b": 0.7}, "avg": 0.625, "snapshots_held": 2},
    {"event": "eval", "step": 4, "checkpoint": 4, "stage": 2, "epoch": 1.5, "active": ["b"], "evaluated": ["a", "b"],
     "scores": {"a": 0.5, "b": 0.8}, "avg": 0.65, "snapshots_held": 2},
    {"event": "decision", "step": 4, "stage": 2, "kind": "no_drop", "excluded": [], "rollback_epoch": None},
    {"event": "end", "step": 4, "stage": 2, "epoch": 1.5, "excluded": ["a"], "best_epoch": 1.5, "best_avg": 0.65},
]
SFT_LOG = [
    {"event": "eval", "step": 0, "checkpoint": 0, "stage": 0, "epoch": 0.0, "active": ["a", "b"], "evaluated": ["a", "b"],
     "scores": {"a": 0.2, "b": 0.1}, "avg": 0.15, "snapshots_held": 1},
    {"event": "train", "step": 1, "epoch": 0.5, "loss": 2.0, "lr": 1e-5, "tokens": 10, "tok_per_s": 1.0, "real_frac": 1.0},
    {"event": "eval", "step": 1, "checkpoint": 1, "stage": 0, "epoch": 0.5, "active": ["a", "b"], "evaluated": ["a", "b"],
     "scores": {"a": 0.6, "b": 0.3}, "avg": 0.45, "snapshots_held": 1},
    {"event": "end", "step": 1, "stage": 0, "epoch": 0.5, "best_epoch": 0.5, "best_avg": 0.45},
]


def write_run(root: Path, name, method, seed, scores, avg, epoch, fl, log, signal="acc", finished=True, best=None):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "args.json").write_text(json.dumps({"method": method, "seed": seed, "signal": signal}))
    if best is None:  # the last checkpoint evaluated at that epoch
        best = ([e["checkpoint"] for e in log if e["event"] == "eval" and e["epoch"] == epoch] or [0])[-1]
    final = {"event": "final", "best_epoch": epoch, "best_checkpoint": best, "best_avg": 0.0, "scores": scores,
             "test_avg": avg,
             "flops": {"train": fl[0], "eval": fl[1], "total": fl[0] + fl[1], "paper_eval": 2 * fl[1],
                       "paper_total": fl[0] + 2 * fl[1], "test": 50}, "peak_snapshots": 2}
    (folder / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log + [final] * finished))
    if finished:
        summary = {"args": {"seed": seed}, "method": method, "tasks": sorted(scores), "best_epoch": epoch,
                   "best_checkpoint": best,
                   "test_scores": scores, "test_avg": avg, "flops": final["flops"]}
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture
def seeded(tmp_path):
    for name, (method, seed, scores, avg, epoch, fl) in RUNS.items():
        write_run(tmp_path, name, method, seed, scores, avg, epoch, fl, MSFT_LOG if method == "msft" else SFT_LOG)
    (tmp_path / "data").mkdir()  # not a method: ignored
    return tmp_path


def test_table_holds_the_logged_numbers_mean_and_std(seeded):
    tbl = compare.report(seeded)
    assert tbl == json.loads((seeded / "table.json").read_text())
    assert list(tbl["methods"]) == ["sft", "msft"] and tbl["tasks"] == ["a", "b"] and tbl["unfinished"] == []
    sft, msft = tbl["methods"]["sft"], tbl["methods"]["msft"]
    assert sft["runs"] == ["sft-seed20", "sft-seed21"] and sft["seeds"] == [20, 21]
    assert sft["test_scores"]["a"]["values"] == [0.5, 0.6]
    assert sft["test_scores"]["a"]["mean"] == pytest.approx(0.55)
    assert sft["test_scores"]["a"]["std"] == pytest.approx(math.sqrt(2 * 0.05 ** 2 / 1))  # sample std, n - 1 = 1
    assert msft["test_avg"]["mean"] == pytest.approx(0.775)
    assert msft["avg_minus_sft"] == pytest.approx(0.775 - 0.65)
    assert msft["best_epoch"]["mean"] == pytest.approx(1.25) and msft["best_epoch"]["std"] == pytest.approx(0.5 / 2 ** 0.5)
    assert sft["flops"]["total"]["values"] == [700, 720]
    assert msft["flops_over_sft"]["total"] == pytest.approx(370 / 710)
    assert msft["flops_over_sft"]["train"] == pytest.approx(310 / 600)
    assert msft["flops_over_sft"]["paper_total"] == pytest.approx(430 / 820)
    md = (seeded / "table.md").read_text()
    # accuracy in %: sft a 55.0 ± 7.1, b 75.0 ± 7.1, avg 65.0 ± 7.1, epoch 0.75 ± 0.35
    assert "| sft | 20, 21 | 55.0 ± 7.1 | 75.0 ± 7.1 | 65.0 ± 7.1 | — | 0.75 ± 0.35 |" in md
    assert "| msft | 20, 21 | 85.0 ± 7.1 | 70.0 ± 14.1 | 77.5 ± 3.5 | +12.5 | 1.25 ± 0.35 |" in md
    assert ("| sft | 6.000e+02 ± 0.0e+00 | 1.100e+02 ± 1.4e+01 | 7.100e+02 ± 1.4e+01 | 2.200e+02 ± 2.8e+01 | "
            "8.200e+02 ± 2.8e+01 | 1.00x | 1.00x | 5.000e+01 ± 0.0e+00 |") in md
    assert ("| msft | 3.100e+02 ± 1.4e+01 | 6.000e+01 ± 0.0e+00 | 3.700e+02 ± 1.4e+01 | 1.200e+02 ± 0.0e+00 | "
            "4.300e+02 ± 1.4e+01 | 0.52x | 0.52x | 5.000e+01 ± 0.0e+00 |") in md


def test_report_mode_single_seed_loss_signal_and_unfinished(tmp_path, capsys):
    write_run(tmp_path, "sft", "sft", 20, {"a": -1.25, "b": -0.5}, -0.875, 0.5, (600, 100), SFT_LOG, "loss")
    write_run(tmp_path, "msft", "msft", 20, {"a": -1.0, "b": -0.25}, -0.625, 1.5, (300, 50), MSFT_LOG, "loss")
    write_run(tmp_path, "msft-seed21", "msft", 21, {"a": 0, "b": 0}, 0, 0, (1, 1), MSFT_LOG[:3], "loss", finished=False)
    compare.main(["--report", str(tmp_path)])
    md = (tmp_path / "table.md").read_text()
    assert md in capsys.readouterr().out
    assert "| sft | 20 | -1.2500 | -0.5000 | -0.8750 | — | 0.50 |" in md  # one seed: no ±
    assert "| msft | 20 | -1.0000 | -0.2500 | -0.6250 | +0.2500 | 1.50 |" in md
    assert "| msft | 3.000e+02 | 5.000e+01 | 3.500e+02 | 1.000e+02 | 4.000e+02 | 0.50x | 0.50x | 5.000e+01 |" in md
    assert "Unfinished runs, not in the tables: msft-seed21." in md
    assert json.loads((tmp_path / "table.json").read_text())["methods"]["msft"]["seeds"] == [20]


def test_runs_made_with_flags_that_change_scores_or_flops_are_not_put_side_by_side(tmp_path):
    """The mSFT run evaluated 16 selection rows a task and the SFT run all of them: their FLOPs ratio would be the
    flag's, not the methods'."""
    write_run(tmp_path, "sft", "sft", 20, {"a": 0.5, "b": 0.7}, 0.6, 0.5, (600, 100), SFT_LOG)
    folder = write_run(tmp_path, "msft", "msft", 20, {"a": 0.9, "b": 0.6}, 0.75, 1.0, (300, 60), MSFT_LOG)
    args = json.loads((folder / "args.json").read_text())
    (folder / "args.json").write_text(json.dumps({**args, "eval_limit": 16}))
    with pytest.raises(SystemExit, match="sft and msft ran with different flags that change scores or FLOPs: "
                                         "--eval-limit None and 16"):
        compare.report(tmp_path)


def test_the_chosen_checkpoint_is_found_by_its_identity_not_its_epoch(tmp_path):
    """After the roll-back to 0.5, epoch 1.0 is two checkpoints: 2 (stage 1, a = 0.4) and 3 (stage 2, a = 0.55)."""
    for best, a in ((2, 0.4), (3, 0.55)):
        folder = write_run(tmp_path / str(best), "msft", "msft", 20, {"a": 0.5, "b": 0.5}, 0.5, 1.0, (300, 60),
                           MSFT_LOG, best=best)
        chosen = compare.chosen_eval(compare.read_run(folder))
        assert (chosen["checkpoint"], chosen["epoch"], chosen["scores"]["a"]) == (best, 1.0, a)


def test_curves_cut_at_the_roll_back_and_mark_the_drop():
    c = compare.curves(MSFT_LOG)
    assert c["segments"] == {"a": [[(0.0, 0.2), (0.5, 0.6), (1.0, 0.4)], [(0.5, 0.6), (1.0, 0.55), (1.5, 0.5)]],
                             "b": [[(0.0, 0.1), (0.5, 0.3), (1.0, 0.5)], [(0.5, 0.3), (1.0, 0.7), (1.5, 0.8)]]}
    assert c["jumps"] == [(1.0, 0.5)]
    assert c["drops"] == [(0.5, "a", 0.6, "drop")]
    assert compare.curves(SFT_LOG) == {"segments": {"a": [[(0.0, 0.2), (0.5, 0.6)]], "b": [[(0.0, 0.1), (0.5, 0.3)]]},
                                       "jumps": [], "drops": []}
    # SRO drops at the peak without rolling back; continual ends a task and rolls back to its best checkpoint
    evals = [e for e in MSFT_LOG if e["event"] == "eval"][:3]
    sro = evals[:2] + [{"event": "decision", "kind": "drop", "excluded": ["a"], "rollback_epoch": None, "epoch": 0.5}]
    assert compare.curves(sro + evals[2:])["drops"] == [(0.5, "a", 0.6, "drop")]
    assert compare.curves(sro + evals[2:])["segments"]["a"] == [[(0.0, 0.2), (0.5, 0.6), (1.0, 0.4)]]
    cont = evals + [{"event": "decision", "kind": "next_task", "task": "b", "excluded": [], "rollback_epoch": 0.0}]
    c = compare.curves(cont)
    assert c["drops"] == [(0.0, "b", 0.1, "next_task")] and c["jumps"] == [(1.0, 0.0)]
    assert c["segments"]["b"] == [[(0.0, 0.1), (0.5, 0.3), (1.0, 0.5)], [(0.0, 0.1)]]


def test_plots_are_png_files(seeded):
    pytest.importorskip("matplotlib")
    paths = compare.plot(compare.find_runs(seeded), seeded)
    assert paths == [seeded / "curves.png", seeded / "loss.png", seeded / "task_loss.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_plots_say_how_to_install_it(seeded, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert compare.plot(compare.find_runs(seeded), seeded) == []
    assert "pip install matplotlib" in capsys.readouterr().out
    assert not (seeded / "curves.png").exists()
    compare.report(seeded)  # the tables are still written
    assert (seeded / "table.md").is_file()


def test_bad_input_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        compare.main(["--methods", "sft", "nope"])
    err = capsys.readouterr().err
    assert "invalid choice: 'nope'" in err and "'sft'" in err and "'msft'" in err
    (tmp_path / "sft").mkdir()
    with pytest.raises(SystemExit, match=f"{tmp_path / 'sft'}: no log.jsonl"):
        compare.main(["--report", str(tmp_path)])
    with pytest.raises(SystemExit, match="no run folders"):
        compare.main(["--report", str(tmp_path / "sft")])
    with pytest.raises(SystemExit):
        compare.main(["--report", str(tmp_path), "--methods", "sft"])
    assert "--report only reads the runs in DIR; drop ['--methods']" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"\['--method', '--out'\] are set by compare.py"):
        compare.main(["--out", str(tmp_path / "x"), "--", "--method", "sft", "--out", "y"])
    with pytest.raises(SystemExit, match="--methods sft sft: a value is given twice"):
        compare.main(["--methods", "sft", "sft", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="give both --model and --data"):
        compare.main(["--model", "m", "--out", str(tmp_path / "x")])


def test_bad_seeds_are_refused_naming_the_flag(refused):
    assert "argument --seeds: expected a finite int >= 0, got '-1'" in refused("compare.py", "--seeds", 1, -1)


def test_bad_run_folders_are_refused(tmp_path):
    folder = write_run(tmp_path, "sft", "sft", 20, {"a": 0.5, "b": 0.7}, 0.6, 1.0, (600, 100), SFT_LOG)
    write_run(tmp_path, "msft", "msft", 20, {"a": 0.5, "c": 0.7}, 0.6, 1.0, (600, 100), MSFT_LOG)
    with pytest.raises(SystemExit, match=r"msft: tasks \['a', 'c'\].*sft has tasks \['a', 'b'\]"):
        compare.report(tmp_path)
    write_run(tmp_path, "sft-seed20", "sft", 20, {"a": 0.5, "b": 0.7}, 0.6, 1.0, (600, 100), SFT_LOG)
    with pytest.raises(SystemExit, match="two runs of sft with the same seed"):
        compare.report(tmp_path)
    with open(folder / "log.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(SystemExit, match=f"{folder / 'log.jsonl'}:6: not a JSON line"):
        compare.report(tmp_path)
    (folder / "log.jsonl").write_text((folder / "log.jsonl").read_text().replace("{not json\n", ""))
    (folder / "summary.json").write_text("[1]")
    with pytest.raises(ValueError, match=f"{folder / 'summary.json'}: expected a JSON object"):
        compare.report(tmp_path)


# tiny real runs: 2 demo tasks of 300 rows, 1 epoch, the loss signal
TINY = ["--max-epochs", "1", "--budget", "0.5", "--interval", "0.25", "--signal", "loss", "--eval-limit", "16",
        "--batch-size", "16", "--micro-batch", "8", "--shots", "0", "--max-new-tokens", "4", "--lr", "3e-3",
        "--tasks", "code", "key", "--progress", "0", "--keep-state"]  # resumable once finished, for the test


@pytest.mark.slow
def test_sft_and_msft_end_to_end_skip_and_resume(tmp_path, capfd, monkeypatch):
    # one thread per train.py: on a busy 2-core machine torch's thread pool makes a tiny step ~30x slower
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "cmp"
    tbl = compare.main(["--methods", "msft", "sft", "--out", str(out), "--", *TINY])
    assert list(tbl["methods"]) == ["sft", "msft"] and tbl["tasks"] == ["code", "key"]
    summaries = {m: json.loads((out / m / "summary.json").read_text()) for m in ("sft", "msft")}
    for m, s in summaries.items():
        row = tbl["methods"][m]
        assert {t: c["values"] for t, c in row["test_scores"].items()} == {t: [v] for t, v in s["test_scores"].items()}
        assert row["best_epoch"]["values"] == [s["best_epoch"]]
        assert row["flops"]["total"]["values"] == [s["flops"]["total"]]
        final = [json.loads(line) for line in (out / m / "log.jsonl").read_text().splitlines()][-1]
        assert final["event"] == "final" and final["scores"] == s["test_scores"]
        # the demo's flags where the command line left the default, ours where it did not
        assert s["args"]["max_len"] == DEMO_ARGS["max_len"] and s["args"]["lr"] == 3e-3
        assert s["args"]["max_epochs"] == 1.0 and s["args"]["seed"] == 20 and s["args"]["out"] == str(out / m)
    ratio = summaries["msft"]["flops"]["total"] / summaries["sft"]["flops"]["total"]
    assert tbl["methods"]["msft"]["flops_over_sft"]["total"] == ratio
    assert "sft: starting" in capfd.readouterr().out
    # a second call: sft is finished and skipped; msft lost its summary (as if killed at the end) and is resumed
    sft_time = (out / "sft" / "summary.json").stat().st_mtime_ns
    (out / "msft" / "summary.json").unlink()
    again = compare.main(["--methods", "sft", "msft", "--out", str(out), "--", *TINY])
    printed = capfd.readouterr().out
    assert "sft: finished, skipped" in printed and "msft: resuming" in printed
    assert (out / "sft" / "summary.json").stat().st_mtime_ns == sft_time
    assert again["methods"]["msft"]["test_scores"] == tbl["methods"]["msft"]["test_scores"]
    # a finished run with other flags is not silently mixed into the table
    with pytest.raises(SystemExit, match="finished run with other arguments.*'lr': \\(0.003, 0.001\\)"):
        compare.main(["--methods", "sft", "--out", str(out), "--", *TINY, "--lr", "1e-3"])
