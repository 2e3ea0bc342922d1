"""cdp-search with the real trainer (cdp-pretrain, megatron.core on CPU) at a tiny shape:
three trials, the export and the report. Slow (about 20 s of training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")
pytest.importorskip("megatron.core")

from optuna.trial import TrialState  # noqa: E402

from cdp_megatron import convert  # noqa: E402
from cdp_megatron.search.cli import main  # noqa: E402
from cdp_megatron.search.report import main as report  # noqa: E402
from cdp_megatron.spec import load_spec  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.megatron]

TINY = {
    "schema_version": 1,
    "description": "tiny proxy for the search test",
    "base": {"hidden_size": 32, "num_layers": 2, "num_attention_heads": 2, "ffn_hidden_size": 64,
             "seq_length": 32, "global_batch_size": 4, "train_iters": 10, "vocab_size": 128},
    "global": {"lr": 0.01},
}
# The proxy's flags: the base shape, mock data (101 ids padded to the base's 128) and one
# evaluation at the end.
PROXY = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 2 --ffn-hidden-size 64 --seq-length 32 "
    "--micro-batch-size 4 --global-batch-size 4 --train-iters 10 --normalization RMSNorm --swiglu "
    "--qk-layernorm --position-embedding-type rope --untie-embeddings-and-output-weights "
    "--disable-bias-linear --hidden-dropout 0 --attention-dropout 0 --mock-data --vocab-size 100 "
    "--eval-interval 10 --eval-iters 2 --log-interval 5"
).split()


def test_three_trials_of_the_real_trainer(tmp_path, capsys):
    base = tmp_path / "tiny.json"
    base.write_text(json.dumps(TINY))
    best = tmp_path / "best.json"
    rc = main(["--base", str(base), "--output-dir", str(tmp_path / "out"), "--study", "real", "--space", "type",
               "--search", "lr", "--trials", "3", "--seed", "0", "--trial-timeout", "300",
               "--export", str(best), "--", *PROXY])
    out = capsys.readouterr().out
    assert rc == 0, out
    study = optuna.load_study(study_name="real", storage=f"sqlite:///{tmp_path / 'out' / 'search.db'}")
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:
        folder = Path(t.user_attrs["trial_dir"])
        evals = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()
                 if '"eval"' in line]
        if t.user_attrs["status"] == "ok":
            assert t.value == evals[-1]["val_loss"] and 1.0 < t.value < 6.0
        assert "cdp-pretrain" in (folder / "log.txt").read_text()
    spec = load_spec(best)
    assert spec.provenance["study"] == "real"
    assert convert.main([str(best), "--width", "2x"]) == 0
    assert report(["--storage", f"sqlite:///{tmp_path / 'out' / 'search.db'}", "--output", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "loss_vs_trial.png").stat().st_size > 5000
