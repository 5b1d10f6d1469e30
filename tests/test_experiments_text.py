"""The language-model comparison tool end to end on tiny settings: it runs every seed of
the headline rows, reuses finished runs, and its table carries every metric both modes
report (proper score, MAUVE per decoding beside the reference row, the per-block table)."""

import json

from diffusionblocks.tools import experiments_text

TINY = ["model.layers=2", "model.width=16", "model.heads=2", "model.seq_len=12", "model.eval_windows=4",
        "model.sample_tokens=0", "model.quality_prompts=8", "model.quality_prompt_chars=4", "model.quality_chars=4",
        "model.evaluator=tiny", "blocks=2", "e2e_steps=4", "warmup_e2e_steps=1", "batch_size=4", "checkpoint_every=4"]


def test_the_text_comparison_runs_reuses_and_tabulates(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFUSIONBLOCKS_CACHE", str(tmp_path / "cache"))
    args = ["--preset", "ar-text", "--out", str(tmp_path / "out"), "--seeds", "0", "1", "--threads", "1",
            "--only", "e2e", "blocks", "blocks, target norm 1", "--set", *TINY]
    experiments_text.main(args)
    table = (tmp_path / "out" / "table.md").read_text()
    rows = {row["setting"]: row for row in json.loads((tmp_path / "out" / "summary.json").read_text())}
    assert rows["e2e"]["seeds"] == [0, 1] and rows["blocks"]["seeds"] == [0, 1]
    assert rows["blocks, target norm 1"]["seeds"] == [0]  # an ablation: the first seed only
    assert list(rows["e2e"]["mauve"]) == ["ancestral", "top-p", "greedy"]
    assert list(rows["blocks"]["mauve"]) == ["greedy"]
    for needle in ("| e2e | 2 |", "| blocks | chain (greedy readout) |", "| e2e | top-p |",
                   "true continuations, half against half", "Per level of the chain, `blocks`"):
        assert needle in table, needle
    assert table.splitlines()[0].count("MAUVE scored by evaluator") == 1  # one evaluator for every run
    # Run again: everything is reused, and the figures are the same.
    experiments_text.main(args)
    assert json.loads((tmp_path / "out" / "results.json").read_text())["machine"]["runs_reused"] == 5
    assert (tmp_path / "out" / "table.md").read_text().split("\n", 1)[1] == table.split("\n", 1)[1]
    capsys.readouterr()


def test_the_recurrent_comparison_scores_mauve_at_every_k(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFUSIONBLOCKS_CACHE", str(tmp_path / "cache"))
    tiny = ["model.width=16", "model.heads=2", "model.seq_len=12", "model.mean_recurrence=2", "model.backprop_depth=1",
            "model.recurrence=3", "model.eval_recurrences=2,3", "model.eval_windows=4", "model.sample_tokens=0",
            "model.quality_prompts=8", "model.quality_prompt_chars=4", "model.quality_chars=4", "model.evaluator=tiny",
            "e2e_steps=4", "warmup_e2e_steps=1", "batch_size=4", "checkpoint_every=4"]
    out = tmp_path / "out"
    experiments_text.main(["--preset", "recurrent-text", "--out", str(out), "--seeds", "0", "1", "--threads", "1",
                           "--only", "e2e (Huginn)", "blocks", "--mauve-per-k", "--set", *tiny])
    by_k = json.loads((out / "mauve_by_K.json").read_text())
    assert set(by_k) == {"e2e (Huginn)", "blocks"}
    assert all(set(by_seed) == {"0", "1"} and all(set(runs) == {"2", "3"} for runs in by_seed.values())
               for by_seed in by_k.values())
    table = (out / "table.md").read_text()
    assert "| setting | K = 2 | K = 3 |" in table and "Brier K=3" in table and "over seeds 0, 1" in table
    blocks_k2 = [by_k["blocks"][seed]["2"] for seed in ("0", "1")]
    mean, std = experiments_text.mean_std(blocks_k2)
    assert f"| blocks | {mean:.3f} ± {std:.3f} |" in table
    capsys.readouterr()
