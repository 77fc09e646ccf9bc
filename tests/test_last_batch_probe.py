"""scripts/last_batch_probe.py on real tiny ImageNet (../shared/data): on the 100-per-class copy,
batches of 100 train the paper's MLP-4 recipe better than batches of 128 (profiles/paper_offline.yaml)."""
import argparse
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "tiny_imagenet").is_dir(), reason="no shared real data (../shared/data)")
def test_batches_of_100_train_better_than_128_on_the_offline_copy(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FFL_CACHE", str(tmp_path))
    spec = importlib.util.spec_from_file_location("last_batch_probe", REPO / "scripts" / "last_batch_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    rows = {}
    for name, overrides in probe.VARIANTS.items():
        args = argparse.Namespace(arch="mlp", tasks=5, runs=5, device="cpu", data_root=str(SHARED), quiet=True)
        rows[name], table = probe.probe(name, overrides, args)
        assert rows[name]["networks"] == 25
        assert table.between(0, 100).all() and len(table) == 4 * 2 * 5  # index × feature × (top-1; rank-1, -5, -10, mAP)
    paper, fixed = rows["batch 128 (paper)"], rows["batch 100"]
    assert fixed["train acc median"] > paper["train acc median"] + 20
    assert fixed["at chance (train acc <= 30 %)"] <= paper["at chance (train acc <= 30 %)"]
    assert probe.main(["--tasks", "5", "--runs", "5", "--quiet", "--data-root", str(SHARED)]) == 0  # cached now
    printed = capsys.readouterr().out
    assert "batch 100" in printed and "classification" in printed and "rank1" in printed
