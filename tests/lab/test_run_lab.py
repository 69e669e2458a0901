"""run_lab writes a complete report folder (smoke run: small sweeps, few batches)."""

import csv

import pytest

from ratiorl.lab import run_lab


def test_run_lab_quick_writes_report(tmp_path):
    out = run_lab(str(tmp_path), seed=3, quick=True, K=200, progress=False)
    for name in ("results.csv", "summary.md", "bias_vs_G.png", "variance_vs_T.png",
                 "variance_by_position.png", "token_vs_kl.png"):
        path = tmp_path / name
        assert path.exists() and path.stat().st_size > 0, name
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(out["rows"]) > 0
    sections = {r["section"] for r in rows}
    assert sections == {"bias_vs_G", "token_vs_kl", "variance_vs_T", "by_position", "rewards"}
    assert {"bias_norm", "bias_norm_se", "variance", "mse", "cosine"} <= set(rows[0])
    summary = (tmp_path / "summary.md").read_text()
    for key, claim in out["claims"].items():
        assert isinstance(claim["held"], bool) and claim["text"] in summary
    assert out["seconds"] > 0 and out["files"]["results"].endswith("results.csv")


def test_run_lab_rejects_unknown_options(tmp_path):
    with pytest.raises(ValueError, match="valid"):
        run_lab(str(tmp_path), bogus=1)


def test_module_entry_point_passes_options(tmp_path, monkeypatch):
    import ratiorl.lab.__main__ as entry

    seen = {}

    def fake_run_lab(out, seed=0, quick=False, **kw):
        seen.update(out=out, seed=seed, quick=quick, **kw)
        return {"claims": {"a": {"held": True}}}

    monkeypatch.setattr(entry, "run_lab", fake_run_lab)
    entry.main(["--out", str(tmp_path), "--seed", "4", "--quick", "--batches", "50"])
    assert seen == {"out": str(tmp_path), "seed": 4, "quick": True, "K": 50}
