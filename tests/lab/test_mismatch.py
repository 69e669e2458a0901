"""The lab's sampler/trainer mismatch study: every claim holds on the default configuration, the
exact metric limits are right, and the report files are written."""

import time

import pytest
import torch

from ratiorl.lab.mismatch import (
    MISMATCH_DEFAULTS,
    _objective,
    estimates,
    exact_metrics,
    run_mismatch_study,
)
from ratiorl.lab.tabular import make_problem


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("mismatch")
    t0 = time.perf_counter()
    res = run_mismatch_study(str(out), dict(MISMATCH_DEFAULTS), seed=0, log=lambda m: None)
    res["seconds"] = time.perf_counter() - t0
    res["dir"] = out
    return res


def test_every_claim_holds(study):
    failed = {k: c for k, c in study["claims"].items() if not c["held"]}
    assert not failed, failed
    assert set(study["claims"]) == {
        "mismatch_uncorrected_biased", "mismatch_sequence_unbiased", "mismatch_truncation_tradeoff",
        "mismatch_self_normalized_1_over_G", "mismatch_masked_fraction_exact", "mismatch_metrics_converge"}
    assert study["seconds"] < 120


def test_report_files(study):
    for key in ("mismatch_results", "mismatch_plot"):
        path = study["files"][key]
        assert open(path, "rb").read(), key
    md = study["markdown"]
    for c in study["claims"].values():
        assert c["text"] in md
    # the table has every level x mode and the uncorrected row
    for level in ("none", "token", "cumulative", "geometric", "sequence", "self_normalized"):
        assert f"| {level} |" in md
    sections = {r["section"] for r in study["rows"]}
    assert sections == {"levels", "truncation", "unbiased", "self_normalized_vs_G", "metrics"}


def test_exact_metrics_on_policy_and_by_enumeration():
    p = make_problem(3, 3, 0.0, "random", seed=1)  # mu = pi_old
    ex = exact_metrics(p, 0.5, 2.0)
    assert ex["mismatch_kl_k1"] == pytest.approx(0.0, abs=1e-12)
    assert ex["ess_token"] == pytest.approx(1.0) and ex["ess_sequence"] == pytest.approx(1.0)
    assert ex["masked_frac"] == 0.0
    p = make_problem(3, 3, 0.3, "random", seed=1)
    ex = exact_metrics(p, 0.5, 2.0)
    # k1 and k3 have the same mean under mu: KL(mu || pi_old) of the sequence distribution / T
    assert ex["mismatch_kl_k1"] == pytest.approx(p.kl / 3, rel=1e-9)
    assert ex["mismatch_kl_k3"] == pytest.approx(p.kl / 3, rel=1e-9)
    # the masked mass by brute force over the enumerated sequences
    d = (p.logp - p.old_logp).exp()
    mass = sum(float(p.old_seq_probs[n]) * float(((d[n] < 0.5) | (d[n] > 2.0)).sum()) / 3
               for n in range(d.shape[0]))
    assert ex["masked_frac"] == pytest.approx(mass, rel=1e-12)


def test_uncorrected_equals_pi_old_sampler_identity():
    """With mu = pi_old every correction is the identity: all estimators agree batch by batch."""
    p = make_problem(3, 3, 0.0, "random", seed=2)
    idx = torch.multinomial(p.old_seq_probs, 50 * 4, replacement=True, generator=torch.Generator().manual_seed(0))
    base, _ = estimates(p, _objective("none", None), 4, idx)
    for level in ("token", "cumulative", "geometric", "sequence", "self_normalized"):
        est, m = estimates(p, _objective(level, "mask"), 4, idx)
        torch.testing.assert_close(est, base)
        assert m["mismatch_token_frac"] == 0.0
