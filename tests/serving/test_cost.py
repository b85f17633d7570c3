"""`openinfra cost`: the inference overview's published numbers, overrides and bad input."""

import json

import pytest

from openinfra.cli import main
from openinfra.serving.cost import PUBLISHED, CostInputs, compute_cost

pytestmark = pytest.mark.unit


def test_published_inputs_reproduce_published_table():
    r = compute_cost()
    assert r.cost_per_day == pytest.approx(87_072.0, abs=0.5)
    # 608B / 342B / 168B are rounded to the billion: +-0.5B tokens x $0.55/M is +-$275.
    assert abs(r.income_per_day - PUBLISHED["income_per_day"]) < 275
    assert int(r.margin * 100) == 545
    assert r.income_cache_hit == pytest.approx(342e9 / 1e6 * 0.14)
    assert r.income_output == pytest.approx(168e9 / 1e6 * 2.19)


def test_overrides_change_the_right_terms():
    r = compute_cost(CostInputs(gpu_hour_usd=1.0, avg_nodes=100, gpus_per_node=4))
    assert r.cost_per_day == pytest.approx(100 * 4 * 1.0 * 24)
    r = compute_cost(CostInputs(cache_hit_share=1.0, output_tokens=0))
    assert r.income_per_day == pytest.approx(608e9 / 1e6 * 0.14)


def test_cli_json(capsys):
    assert main(["cost", "--json", "--gpu-hour-price", "3"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["cost_per_day"] == pytest.approx(226.75 * 8 * 3 * 24)
    assert data["inputs"]["gpu_hour_usd"] == 3


def test_cli_table_shows_published_figures(capsys):
    assert main(["cost"]) == 0
    out = capsys.readouterr().out
    assert "$87,072" in out and "$562,100" in out and "545.6%" in out


@pytest.mark.parametrize(
    "argv, word",
    [
        (["--avg-nodes", "0"], "avg_nodes"),
        (["--gpus-per-node", "-8"], "gpus_per_node"),
        (["--cache-hit-share", "1.5"], "cache_hit_share"),
        (["--cache-hit-share", "-0.1"], "cache_hit_share"),
        (["--output-tokens", "-1"], "output_tokens"),
        (["--price-output", "nan"], "price_output_per_m"),
    ],
)
def test_cli_rejects_nonsense_with_one_line_and_exit_2(capsys, argv, word):
    assert main(["cost", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and word in err


def test_cli_rejects_non_numbers():
    with pytest.raises(SystemExit) as exc:
        main(["cost", "--avg-nodes", "many"])
    assert exc.value.code == 2
