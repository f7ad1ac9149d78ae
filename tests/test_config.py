"""Config: TOML loading, overrides, and a clear error for every kind of bad field."""

from __future__ import annotations

import pytest

from plait.config import Config, apply_override, load_config, validate
from plait.errors import ConfigError


def write(tmp_path, text: str):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_are_valid():
    validate(Config())


def test_example_config_loads():
    cfg = load_config("examples/tiny_gpt.toml")
    assert cfg.model.n_layer == 4 and cfg.train.out_dir == "runs/tiny_gpt"


def test_overrides_parse_values_and_types(tmp_path):
    cfg = load_config(write(tmp_path, "[train]\nsteps = 10\n"),
                      ["train.steps=100", "train.lr=0.5", "model.bias=false", "train.out_dir=runs/x"])
    assert cfg.train.steps == 100 and cfg.train.lr == 0.5
    assert cfg.model.bias is False and cfg.train.out_dir == "runs/x"


def test_int_is_accepted_for_float():
    assert Config.from_dict({"train": {"lr": 1}}).train.lr == 1.0


@pytest.mark.parametrize("text,field", [
    ("[train]\nstpes = 3\n", "train.stpes"),
    ("[trian]\nsteps = 3\n", "trian"),
    ("[train]\nsteps = \"many\"\n", "train.steps"),
    ("[train]\nsteps = 1.5\n", "train.steps"),
    ("[model]\nbias = 1\n", "model.bias"),
    ("[train]\nlr = true\n", "train.lr"),
    ("train = 3\n", "train"),
    ("[train]\nsteps = 0\n", "train.steps"),
    ("[train]\nlr = -1.0\n", "train.lr"),
    ("[train]\nmin_lr = 1.0\nlr = 0.1\n", "train.min_lr"),
    ("[train]\nbeta2 = 1.0\n", "train.beta2"),
    ("[train]\ndevice = \"tpu\"\n", "train.device"),
    ("[train]\ndtype = \"float8\"\n", "train.dtype"),
    ("[model]\nn_embd = 30\nn_head = 4\n", "model.n_embd"),
    ("[model]\nvocab_size = 100\n", "model.vocab_size"),
    ("[model]\ndropout = 1.0\n", "model.dropout"),
    ("[data]\nval_fraction = 0.0\n", "data.val_fraction"),
    ("[checkpoint]\nkeep = 0\n", "checkpoint.keep"),
    ("[parallel]\nreducer = \"ring\"\n", "parallel.reducer"),
    ("[parallel]\nbucket_mb = 0\n", "parallel.bucket_mb"),
    ("[parallel]\ndp = -1\n", "parallel.dp"),
])
def test_bad_fields_name_the_field(tmp_path, text, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(write(tmp_path, text))


def test_world_size_must_match_mesh():
    cfg = Config.from_dict({"parallel": {"dp": 2}})
    validate(cfg, 2)
    with pytest.raises(ConfigError, match="world size 4"):
        validate(cfg, 4)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[train\nsteps=1"))


@pytest.mark.parametrize("item,msg", [
    ("train.steps", "no '='"),
    ("steps=3", "section.key"),
    ("a.b.c=3", "section.key"),
])
def test_bad_overrides(item, msg):
    with pytest.raises(ConfigError, match=msg):
        apply_override({}, item)


def test_override_of_unknown_key_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="train.stepz"):
        load_config(None, ["train.stepz=3"])


@pytest.mark.parametrize("parallel,message", [
    ({"tp": 2, "compression": "bf16"}, "parallel.tp=2 cannot be combined with parallel.compression='bf16'"),
    ({"tp": 2, "node_size": 2}, "parallel.tp=2 cannot be combined with parallel.node_size=2"),
    ({"pp": 2, "zero": 1}, "parallel.pp=2 cannot be combined with parallel.zero=1"),
    ({"zero": 3, "compression": "powersgd"}, "cannot be combined with parallel.zero=3"),
    ({"compression": "bf16", "node_size": 2}, "cannot be combined with parallel.node_size=2"),
    ({"offload_optimizer": True}, "parallel.offload_optimizer=True needs parallel.zero"),
    ({"sequence_parallel": True}, "parallel.sequence_parallel=True needs parallel.tp"),
])
def test_cross_strategy_rules_fail_before_any_process_starts(parallel, message):
    """Each rule of the one table in plait.config refuses its combination in validate()."""
    cfg = Config.from_dict({"model": {"n_head": 4}, "parallel": parallel})
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        validate(cfg, world_size=4)


@pytest.mark.parametrize("sections,message", [
    ({"train": {"compile_backend": "tvm"}}, "train.compile_backend='tvm' is invalid"),
    ({"train": {"compile_mode": "fast"}}, "train.compile_mode='fast' is invalid"),
    ({"train": {"compile_backend": "aot_eager", "compile_mode": "max-autotune"}},
     "train.compile_mode='max-autotune' is a mode of the inductor backend"),
    ({"train": {"compile": True}, "parallel": {"tp": 2}}, "train.compile = true cannot be combined with parallel.tp=2"),
    ({"train": {"compile": True}, "parallel": {"pp": 2}}, "train.compile = true cannot be combined with parallel.pp=2"),
    ({"train": {"compile": True}, "parallel": {"zero": 3}}, "parallel.zero=3"),
    ({"train": {"compile": True}, "parallel": {"recompute": "full"}}, "parallel.recompute='full'"),
    ({"train": {"compile": True}, "model": {"arch": "mlp"}}, "model.arch='mlp'"),
    ({"train": {"loss_chunk_rows": -1}}, "train.loss_chunk_rows=-1 must be ≥ 0"),
    ({"train": {"loss_chunk_rows": 64}, "parallel": {"tp": 2}}, "train.loss_chunk_rows=64 cannot be combined with parallel.tp=2"),
    ({"train": {"loss_chunk_rows": 64}, "parallel": {"pp": 2}}, "train.loss_chunk_rows=64 cannot be combined with parallel.pp=2"),
    ({"train": {"loss_chunk_rows": 64}, "parallel": {"zero": 3}}, "parallel.zero=3"),
])
def test_compile_and_loss_chunks_refuse_what_they_cannot_run(sections, message):
    cfg = Config.from_dict({"model": {"n_head": 4, **sections.get("model", {})},
                            **{k: v for k, v in sections.items() if k != "model"}})
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        validate(cfg, world_size=4)


def test_every_combination_rule_names_known_options():
    from plait.config import COMBINATION_RULES, ParallelConfig, _on
    for option, other, kind, why in COMBINATION_RULES:
        assert kind in ("excludes", "requires") and why
        _on(ParallelConfig(), option), _on(ParallelConfig(), other)  # KeyError on an unknown name


def test_config_imports_no_strategy():
    import subprocess
    import sys
    code = "import sys, plait.config; print(sorted(m for m in sys.modules if m.startswith('plait.parallel')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
