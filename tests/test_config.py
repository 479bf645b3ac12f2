"""Typed YAML configs: loading, dotted overrides, and error messages that name the key, the value and the fix."""
from pathlib import Path

import pytest
import yaml

from semanticist_fast.config import ConfigError, load_config, save_config, to_dict
from semanticist_fast.models.tokenizer import SemanticistTokenizer
from semanticist_fast.tasks.tokenizer_stage import TokenizerRun

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_yaml_and_overrides(tmp_path):
    path = _write(tmp_path, {
        "model": {"image_size": 64, "encoder": {"size": "small", "num_slots": 32},
                  "decoder": {"size": "custom", "depth": 2, "hidden": 96, "heads": 4, "patch_size": 4},
                  "codec": {"kind": "pixel"}},
        "optim": {"lr": 1.0e-3, "betas": [0.8, 0.9]},
        "train": {"batch_size": 32},
    })
    run = load_config(TokenizerRun, path, ["train.batch_size=16", "model.encoder.slot_dim=12",
                                           "model.diffusion.sample_steps=ddim25", "optim.schedule=constant",
                                           "model.nested.unit=step", "runtime.fast_kernels=false",
                                           "model.repa.teacher_path=", "optim.min_lr=1e-6"])
    assert isinstance(run, TokenizerRun)
    assert run.model.image_size == 64 and run.model.encoder.size == "small" and run.model.encoder.num_slots == 32
    assert run.model.encoder.resolved() == (384, 12, 6, 16)
    assert run.model.decoder.resolved() == (2, 96, 4) and run.model.decoder.patch_size == 4
    assert run.optim.lr == 1.0e-3 and run.optim.betas == (0.8, 0.9) and isinstance(run.optim.betas, tuple)
    assert run.train.batch_size == 16  # the override wins over the file
    assert run.model.encoder.slot_dim == 12
    assert run.model.diffusion.sample_steps == "ddim25"
    assert run.optim.schedule == "constant" and run.model.nested.unit == "step"
    assert run.runtime.fast_kernels is False
    assert run.model.repa.teacher_path == ""
    assert run.optim.min_lr == pytest.approx(1e-6) and isinstance(run.optim.min_lr, float)
    # Untouched fields keep their defaults.
    assert run.train.epochs == TokenizerRun().train.epochs


def test_numeric_string_field_and_int_to_float(tmp_path):
    # YAML reads 250 as an int; the field is a string.
    run = load_config(TokenizerRun, None, ["model.diffusion.sample_steps=250", "optim.weight_decay=0",
                                           "model.codec.kind=pixel"])
    assert run.model.diffusion.sample_steps == "250"
    assert run.optim.weight_decay == 0.0 and isinstance(run.optim.weight_decay, float)


def test_save_and_reload_round_trip(tmp_path):
    run = load_config(TokenizerRun, None, ["model.codec.kind=pixel", "model.encoder.size=tiny", "train.seed=7"])
    save_config(run, tmp_path / "config.yaml")
    again = load_config(TokenizerRun, tmp_path / "config.yaml")
    assert again == run
    assert to_dict(again) == to_dict(run)


@pytest.mark.parametrize("override,wrong,suggestion", [
    ("train.batchsize=4", "train.batchsize", "train.batch_size"),
    ("model.encoder.dimm=8", "model.encoder.dimm", "model.encoder.dim"),
    ("model.decodr.size=S", "model.decodr", "model.decoder"),
    ("optm.lr=1", "optm", "optim"),
])
def test_unknown_override_names_key_and_suggests(override, wrong, suggestion):
    with pytest.raises(ConfigError) as e:
        load_config(TokenizerRun, None, [override])
    msg = str(e.value)
    assert f"unknown config key {wrong}" in msg
    assert f"Did you mean {suggestion}?" in msg


def test_unknown_yaml_key_names_key_and_suggests(tmp_path):
    path = _write(tmp_path, {"model": {"encoder": {"num_slot": 8}}})
    with pytest.raises(ConfigError, match=r"model\.encoder\.num_slot\b.*Did you mean model\.encoder\.num_slots\?"):
        load_config(TokenizerRun, path)
    path = _write(tmp_path, {"modle": {"image_size": 32}})
    with pytest.raises(ConfigError, match=r"unknown config key modle\. Did you mean model\?"):
        load_config(TokenizerRun, path)


def test_nested_unknown_section(tmp_path):
    path = _write(tmp_path, {"model": {"encoder": {"vit": {"dim": 3}}}})
    with pytest.raises(ConfigError, match=r"model\.encoder\.vit"):
        load_config(TokenizerRun, path)
    with pytest.raises(ConfigError, match=r"unknown config key model\.scheduler\. "):
        load_config(TokenizerRun, None, ["model.scheduler.kind=x"])
    with pytest.raises(ConfigError, match=r"train\.batch_size is a value, not a section"):
        load_config(TokenizerRun, None, ["train.batch_size.value=3"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(TokenizerRun, None, ["train.batch_size"])


@pytest.mark.parametrize("override,key,choices", [
    ("model.decoder.size=XXL", "model.decoder.size", ["'S'", "'B'", "'L'", "'XL'", "'custom'"]),
    ("model.decoder.patch_size=3", "model.decoder.patch_size", ["1", "2", "4", "8"]),
    ("train.precision=fp16", "train.precision", ["'bf16'", "'fp32'"]),
    ("model.codec.kind=vq", "model.codec.kind", ["'pixel'", "'kl16'"]),
])
def test_bad_literal_lists_choices(override, key, choices):
    with pytest.raises(ConfigError) as e:
        load_config(TokenizerRun, None, [override])
    msg = str(e.value)
    assert msg.startswith(key + ":")
    assert "choose one of" in msg
    for choice in choices:
        assert choice in msg


@pytest.mark.parametrize("override,key,value", [
    ("train.batch_size=abc", "train.batch_size", "'abc'"),
    ("train.epochs=2.5", "train.epochs", "2.5"),
    ("optim.blr=fast", "optim.blr", "'fast'"),
    ("train.progress=maybe", "train.progress", "'maybe'"),
    ("model.encoder.dim=wide", "model.encoder.dim", "'wide'"),
    ("train.batch_size=true", "train.batch_size", "True"),
])
def test_wrong_type_names_key_and_value(override, key, value):
    with pytest.raises(ConfigError) as e:
        load_config(TokenizerRun, None, [override])
    msg = str(e.value)
    assert key in msg and value in msg


def test_wrong_type_in_yaml(tmp_path):
    path = _write(tmp_path, {"optim": {"betas": [0.9]}})
    with pytest.raises(ConfigError, match=r"optim\.betas"):
        load_config(TokenizerRun, path)
    path = _write(tmp_path, {"model": {"encoder": 5}})
    with pytest.raises(ConfigError, match=r"model\.encoder: expected a mapping"):
        load_config(TokenizerRun, path)
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(TokenizerRun, path)


def test_validation_errors_are_value_errors():
    # ConfigError is a ValueError, so the CLI reports both the same way.
    with pytest.raises(ValueError, match="divisible"):
        load_config(TokenizerRun, None, ["model.encoder.size=custom", "model.encoder.dim=10", "model.encoder.depth=1",
                                         "model.encoder.heads=3", "model.encoder.patch_size=4", "model.codec.kind=pixel"])
    with pytest.raises(ValueError, match="codec.path"):
        load_config(TokenizerRun, None, ["model.codec.kind=kl16"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TokenizerRun, "/nonexistent/config.yaml")


def test_sections_left_at_defaults_are_validated(tmp_path):
    path = _write(tmp_path, {"model": {"image_size": 256}})  # no codec section: the default KL-16 codec has no path
    with pytest.raises(ValueError, match="codec.path"):
        load_config(TokenizerRun, path)


def test_config_files_exist():
    assert CONFIGS, "no configs/*.yaml found"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_file_loads(path, tmp_path):
    from semanticist_fast.tasks import spec_for_file

    spec = spec_for_file(path)
    run = load_config(spec.run_config, path)
    assert run.kind == spec.kind
    save_config(run, tmp_path / path.name)
    assert load_config(spec.run_config, tmp_path / path.name) == run


def test_tiny_config_builds_its_model():
    path = ROOT / "configs" / "tokenizer_tiny.yaml"
    if not path.is_file():
        pytest.skip("configs/tokenizer_tiny.yaml is not present")
    run = load_config(TokenizerRun, path)
    assert run.model.codec.kind == "pixel" and run.model.image_size == 32
    model = SemanticistTokenizer(run.model)
    assert model.num_slots == run.model.encoder.num_slots
    assert model.dit.null_cond.shape == (1, run.model.encoder.num_slots, run.model.encoder.slot_dim)


@pytest.mark.parametrize("override, new", [
    ("model.diffusion.cfg=2.0", "model.diffusion.guidance"),
])
def test_renamed_key_is_an_error_that_names_the_new_one(override, new, tmp_path):
    with pytest.raises(ConfigError, match=f"renamed: use {new}"):
        load_config(TokenizerRun, None, [override])
    with pytest.raises(ConfigError, match=f"renamed: use {new}"):
        load_config(TokenizerRun, _write(tmp_path, {"model": {"diffusion": {"cfg": 2.0}}}))


def test_ar_sample_section_renames():
    from semanticist_fast.tasks.autoregressive_stage import ARRun

    for old, new in (("cfg", "guidance"), ("cfg_schedule", "guidance_schedule"), ("decoder_cfg", "decoder_guidance")):
        with pytest.raises(ConfigError, match=f"sample.{old} was renamed: use sample.{new}"):
            load_config(ARRun, None, [f"sample.{old}=2"])


def test_configs_saved_before_a_rename_still_load():
    from semanticist_fast.config import from_dict, migrate_saved
    from semanticist_fast.inference.generation import SampleConfig
    from semanticist_fast.models.tokenizer import TokenizerConfig

    old = {"diffusion": {"cfg": 1.5, "sample_steps": "ddim25"}, "image_size": 32, "codec": {"kind": "pixel"}}
    cfg = from_dict(TokenizerConfig, migrate_saved(TokenizerConfig, old), prefix="model.")
    assert cfg.diffusion.guidance == 1.5 and cfg.diffusion.sample_steps == "ddim25"
    sample = from_dict(SampleConfig, migrate_saved(SampleConfig, {"cfg": 3.0, "decoder_cfg": 2.0}))
    assert (sample.guidance, sample.decoder_guidance) == (3.0, 2.0)


@pytest.mark.parametrize("overrides, key", [
    (["model.diffusion.objective=flow", "model.decoder.learn_sigma=true", "model.diffusion.sample_steps=euler4"],
     "model.decoder.learn_sigma=false"),
    (["model.diffusion.objective=flow", "model.decoder.learn_sigma=false", "model.diffusion.sample_steps=250"],
     "model.diffusion.sample_steps='250'"),
    (["model.diffusion.objective=ddpm", "model.diffusion.sample_steps=euler4"], "model.diffusion.sample_steps='euler4'"),
])
def test_objective_and_sampler_must_agree(overrides, key):
    with pytest.raises(ValueError, match=key.replace("'", ".").replace("=", ".")):
        load_config(TokenizerRun, None, ["model.codec.kind=pixel"] + overrides)
