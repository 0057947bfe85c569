"""`pipeline plan-teacher`: parameter counts without weights, the law-of-capacity-gap recommendation and
chain, and MiniDisc's ranking of teacher assistants."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kd_pipeline.pipeline import app
from kd_pipeline.train.capacity import (
    CapacityError,
    ModelSize,
    PlanConfig,
    assistant_chain,
    count_from_safetensors,
    count_parameters,
    model_size,
    parse_count,
    plan_teacher,
    rank_assistants,
    read_assistants,
    recommend_teacher,
)


def llama_config(hidden: int, layers: int, tie: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=320,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
    )


@pytest.mark.parametrize("tie", [False, True])
def test_counts_from_config_and_safetensors_equal_the_instantiated_model(tmp_path, tie):
    from transformers import LlamaForCausalLM

    config = llama_config(64, 3, tie)
    model = LlamaForCausalLM(config)
    expected = sum(p.numel() for p in model.parameters())
    config_dir, weights_dir = tmp_path / "config", tmp_path / "weights"
    config.save_pretrained(config_dir)  # a config-only directory: nothing to load
    model.save_pretrained(weights_dir)
    counted = count_parameters(str(config_dir))
    assert (counted.params, counted.source) == (expected, "config")
    assert counted.embedding_params == model.get_input_embeddings().weight.numel()
    assert count_parameters(str(weights_dir)).params == expected
    assert count_from_safetensors(weights_dir) == expected  # tied weights are stored once
    raw = {"model_type": "llama", **config.to_diff_dict()}
    (tmp_path / "student.json").write_text(json.dumps(raw))
    assert count_parameters(str(tmp_path / "student.json")).params == expected


def test_unbuildable_architecture_falls_back_to_safetensors_headers(tmp_path):
    from safetensors.torch import save_file

    save_file({"a.weight": torch.zeros(3, 5), "b.bias": torch.zeros(7)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    size = count_parameters(str(tmp_path))
    assert (size.params, size.source) == (22, "safetensors")
    with pytest.raises(CapacityError, match="cannot count"):
        count_parameters(str(tmp_path / "missing"))


def test_parse_count_and_candidate_forms(tmp_path):
    assert parse_count("7B") == 7_000_000_000 and parse_count("350m") == 350_000_000
    assert parse_count("1.5e9") == 1_500_000_000 and parse_count(125) == 125
    with pytest.raises(CapacityError):
        parse_count("seven")
    assert model_size("llama-70b=70B") == ModelSize("llama-70b", 70 * 10**9)
    assert model_size("3B") == ModelSize("3B", 3 * 10**9)


def sizes(**named: float) -> list[ModelSize]:
    return [ModelSize(name, int(n * 1e9)) for name, n in named.items()]


def test_recommendation_is_the_candidate_nearest_the_optimal_size():
    student = ModelSize("s", 10**9)
    candidates = sizes(a=0.5, b=2.0, c=3.0, d=8.0)
    # optimal 2.5B: |log(3/2.5)| = 0.18 < |log(2/2.5)| = 0.22; the smaller-than-student candidate never counts.
    assert recommend_teacher(student, candidates).name == "c"
    assert recommend_teacher(student, candidates, ratio=2.0).name == "b"
    assert recommend_teacher(student, sizes(big=80.0)).name == "big"
    with pytest.raises(CapacityError, match="no candidate is larger"):
        recommend_teacher(student, sizes(a=0.5))


def test_chain_only_beyond_ratio_squared_and_geometrically_spaced():
    student = ModelSize("s", 10**9)
    assert assistant_chain(student, sizes(a=3.0, b=6.0)) == []  # 6x <= 2.5^2 = 6.25x: one hop is enough
    # 70x: round(log 70 / log 2.5) = 5 hops, ideal assistants 70^(k/5) = 2.34, 5.47, 12.8, 29.9 B.
    chain = assistant_chain(student, sizes(x2=2.0, x5=5.0, x13=13.0, x30=30.0, x70=70.0, x1=1.2))
    assert [c.name for c in chain] == ["x70", "x30", "x13", "x5", "x2", "s"]
    # Few candidates: nearest picks are merged, never duplicated, and the chain stays strictly decreasing.
    chain = assistant_chain(student, sizes(x2=2.0, x70=70.0))
    assert [c.name for c in chain] == ["x70", "x2", "s"]


def test_minidisc_scores_by_hand(tmp_path):
    csv = tmp_path / "assistants.csv"
    csv.write_text(
        "name,params,metric\nta-6L,600M,0.80\nta-4L,400M,0.78\nta-2L,200M,0.70\nbig,1.2B,0.9\ntiny,100M,0.5\n"
    )
    rows = read_assistants(csv)
    ranked = rank_assistants(rows, teacher_params=10**9, student_params=100 * 10**6, lam=0.2)
    # score = metric + 0.2 * (1 - params / 1B)
    assert [(a.name, a.score) for a in ranked[:3]] == [
        ("ta-4L", pytest.approx(0.78 + 0.2 * 0.6)),  # 0.900
        ("ta-6L", pytest.approx(0.80 + 0.2 * 0.4)),  # 0.880
        ("ta-2L", pytest.approx(0.70 + 0.2 * 0.8)),  # 0.860
    ]
    assert [(a.name, a.score, a.note) for a in ranked[3:]] == [
        ("big", None, "not smaller than the teacher"),
        ("tiny", None, "not larger than the student"),
    ]
    losses = tmp_path / "assistants.json"  # eval losses: lower is better, the metric is -loss
    rows = [{"name": "a", "params": 5e8, "eval_loss": 2.0}, {"name": "b", "params": 2.5e8, "eval_loss": 2.04}]
    losses.write_text(json.dumps(rows))
    ranked = rank_assistants(read_assistants(losses), teacher_params=10**9)
    # The smaller assistant wins despite its higher loss: -2.04 + 0.2 * 0.75 = -1.89 > -2.0 + 0.2 * 0.5 = -1.9.
    assert [(a.name, round(a.score, 6)) for a in ranked] == [("b", -1.89), ("a", -1.9)]
    mixed = tmp_path / "mixed.csv"
    mixed.write_text("name,params,metric,eval_loss\na,1B,0.5,\nb,1B,,2.0\n")
    with pytest.raises(CapacityError, match="mixes"):
        read_assistants(mixed)


def test_plan_teacher_cli_on_synthetic_configs(tmp_path):
    paths = {}
    for name, (hidden, layers) in {"student": (32, 1), "t-small": (48, 2), "t-mid": (64, 4), "t-big": (128, 8)}.items():
        paths[name] = tmp_path / name
        llama_config(hidden, layers).save_pretrained(paths[name])
    candidates = [str(paths[n]) for n in ("t-small", "t-mid", "t-big")]
    plan = plan_teacher(PlanConfig(student=str(paths["student"]), candidates=candidates))
    s = plan.student.params
    ratios = {Path(c.name).name: c.params / s for c in plan.candidates}
    assert ratios["t-big"] > 6.25  # the synthetic configs span a gap that needs a chain
    nearest = min(ratios, key=lambda n: abs(math.log(ratios[n] / 2.5)))
    assert Path(plan.recommended.name).name == nearest
    assert [Path(c.name).name for c in plan.chain][0] == "t-big" and plan.chain[-1] == plan.student

    csv = tmp_path / "ta.csv"
    csv.write_text(f"name,params,eval_loss\nmid,{ratios['t-mid'] * s:.0f},2.0\nsmall,{ratios['t-small'] * s:.0f},2.2\n")
    result = CliRunner().invoke(
        app,
        [
            "plan-teacher",
            "--student",
            str(paths["student"]),
            "--candidate",
            str(paths["t-small"]),
            "--candidate",
            str(paths["t-mid"]),
            "--candidate",
            str(paths["t-big"]),
            "--assistants",
            str(csv),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["recommended"]["name"] == str(paths[nearest]) and out["teacher"]["name"] == str(paths["t-big"])
    teacher = out["teacher"]["params"]
    expected = {  # -eval_loss + 0.2 * (1 - params / teacher)
        "mid": -2.0 + 0.2 * (1 - ratios["t-mid"] * s / teacher),
        "small": -2.2 + 0.2 * (1 - ratios["t-small"] * s / teacher),
    }
    ranked = sorted(expected.items(), key=lambda kv: -kv[1])
    assert [(a["name"], pytest.approx(a["score"], abs=1e-6)) for a in out["assistants"]] == ranked
    text = CliRunner().invoke(app, ["plan-teacher", "--student", "1B", "--candidate", "t=70B"]).output
    assert "<- recommended" in text and "teacher assistants" in text
    bad = CliRunner().invoke(app, ["plan-teacher", "--student", "1B"])
    assert bad.exit_code == 2 and "--candidate" in bad.output


def test_a_hop_above_ratio_squared_is_warned_about_with_the_assistant_that_would_split_it():
    """Issue 20: 70B -> 8B (8.75x) -> 1B (8.00x) was proposed without a word that both hops exceed 2.5² = 6.25x."""
    plan = plan_teacher(PlanConfig(student="1B", candidates=["llama-8b=8B", "llama-70b=70B"]))
    assert [c.name for c in plan.chain] == ["llama-70b", "llama-8b", "1B"]
    assert plan.warnings == [
        "llama-70b -> llama-8b is 8.75x, above 2.5² = 6.25x: no candidate lies between them; an assistant near "
        "23.7B would split it (--candidate NAME=SIZE)",  # sqrt(70 * 8) = 23.66
        "llama-8b -> 1B is 8.00x, above 2.5² = 6.25x: no candidate lies between them; an assistant near 2.83B "
        "would split it (--candidate NAME=SIZE)",  # sqrt(8 * 1) = 2.83
    ]
    result = CliRunner().invoke(app, ["plan-teacher", "--student", "1B", "--candidate", "a=8B", "--candidate", "b=70B"])
    assert result.exit_code == 0 and result.output.count("\nwarning: ") == 2, result.output
    as_json = CliRunner().invoke(app, ["plan-teacher", "--student", "1B", "--candidate", "t=70B", "--json"])
    # One 70x hop: round(log 70 / log 2.5) = 5 hops, assistants at 70^(j/5) = 29.9, 12.8, 5.47, 2.34 B.
    assert json.loads(as_json.output)["warnings"] == [
        "t -> 1B is 70.00x, above 2.5² = 6.25x: no candidate lies between them; assistants near 29.9B, 12.8B, "
        "5.47B, 2.34B would split it (--candidate NAME=SIZE)"
    ]
    # Hops within the law's ratio², and a gap that needs no chain: nothing to warn about.
    spaced = plan_teacher(PlanConfig(student="1B", candidates=["a=2.5B", "b=6B", "c=15B", "d=40B"]))
    assert len(spaced.chain) == 5 and spaced.warnings == []
    assert plan_teacher(PlanConfig(student="1B", candidates=["a=3B", "b=6B"])).warnings == []


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--student", "1B", "--candidate", "7"],
            "error: --candidate 7: a bare number has no unit; write 7B for 7 billion parameters (7M million, "
            "7K thousand) or a count such as 7e9",
        ),
        (["--student", "1B", "--candidate", "llama=7"], "error: --candidate llama=7: a bare number has no unit"),
        (["--student", "1.5", "--candidate", "7B"], "error: --student 1.5: a bare number has no unit; write 1.5B"),
        (
            ["--student", "0B", "--candidate", "7B"],
            "error: --student 0B: 0 parameters; a model has at least one (sizes read like 1B, 350M)",
        ),
        (["--student", "1B", "--candidate", "t=0M"], "error: --candidate t=0M: 0 parameters"),
    ],
)
def test_sizes_without_a_unit_and_empty_models_are_refused_in_one_line(args, message):
    result = CliRunner().invoke(app, ["plan-teacher", *args])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith(message), result.output


def test_a_count_in_scientific_notation_needs_no_unit():
    plan = plan_teacher(PlanConfig(student="1e9", candidates=["t=2.5e9"]))
    assert (plan.student.params, plan.recommended.params, plan.warnings) == (10**9, 25 * 10**8, [])
