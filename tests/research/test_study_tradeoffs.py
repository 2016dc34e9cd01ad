"""The study's cross-round summary on the committed evaluation records: each recipe's trainings are
counted once even where a round's jobs file was seeded with an earlier round's records (rounds 11
and 12 carry round 10's, round 13 round 12's), a training repeated in a later round (round 13's
seeds 0 and 1, and CPT) counts as another, and the figures quoted in research/LOG.md's round 13 come back."""

from __future__ import annotations

from tests.scripts import ROOT, load_script


def test_recipe_summary_counts_each_training_once():
    mod = load_script("research/plot_study_tradeoffs.py")
    ppl, pk, prompts = mod.figures(ROOT / "research" / "results")
    rows = {
        line.split(" | ")[0].lstrip("| "): [c.strip() for c in line.strip("|").split("|")]
        for line in mod.recipe_summary(ppl, pk, prompts)[2:]
    }
    assert {name: cells[1] for name, cells in rows.items()} == {
        "ce22 on PI×4": "9",
        "ce22 + attention map (qk 1) on PI×4": "6",
        "ce22 on YaRN×4": "3",
        "CPT": "8",
    }
    # research/LOG.md, round 13: each recipe over its trainings against CPT's eight
    assert rows["ce22 + attention map (qk 1) on PI×4"][4:7] == [
        "20.56 (20.49 to 20.62)",
        "0.0017",
        "43.5 (31.0 to 52.0)",
    ]
    assert rows["ce22 on PI×4"][4:6] == ["20.57 (20.35 to 20.70)", "0.11"]
    assert rows["ce22 on YaRN×4"][5] == "0.0061"
    assert rows["CPT"][6] == "4.3 (3.0 to 6.0); 7 trainings"
