"""Generation from the first k tokens (`sample --tokens k`): k AR steps, then the decoder from that prefix with the
other slots nulled, exactly as a reconstruction from the first k tokens decodes; and the one list of sampling
settings the CLI's options are made from. Tiny random models (the compiled sampler's k: tests/test_export.py)."""
from pathlib import Path

import pytest
import torch

from helpers import micro_tokenizer_run, randomized
from semanticist_fast.cli import build_parser
from semanticist_fast.common.sample_settings import SETTINGS, SampleConfig, sample_options
from semanticist_fast.config import ConfigError, from_dict
from semanticist_fast.inference import EagerSampler, Tokenizer, generate, sample_images
from semanticist_fast.inference.generation import LoadedGenerator
from semanticist_fast.models.gpt import GPT, GPTConfig
from semanticist_fast.models.latent_codec import build_codec
from semanticist_fast.models.tokenizer import SemanticistTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
N = 3  # the AR model's tokens (of the tokenizer's 4 slots)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    run = micro_tokenizer_run("model.diffusion.sample_steps=euler3")
    tok = Tokenizer(randomized(SemanticistTokenizer(run.model), seed=1), build_codec(run.model.codec), "cpu")
    cfg = GPTConfig(size="custom", layers=2, heads=2, dim=32, head_width=32, head_depth=2, num_classes=5,
                    num_tokens=N, head_sample_steps=4)
    return randomized(GPT(cfg), seed=2).eval(), tok


SETTINGS_USED = dict(guidance=2.0, head_steps=4, decoder_guidance=1.5)
LABELS = torch.tensor([0, 3, 4])


def draw(models, **settings) -> torch.Tensor:
    gpt, tok = models
    return sample_images(gpt, tok, LABELS, SampleConfig(**SETTINGS_USED, **settings), torch.Generator().manual_seed(0))


def test_all_tokens_is_the_default_draw(models):
    gpt, tok = models
    default = draw(models)
    assert default.std() > 0.05  # the random models draw varied images
    assert torch.equal(draw(models, tokens=N), default)
    # ... which is the full AR draw decoded from all N tokens, as before the setting existed.
    g = torch.Generator().manual_seed(0)
    tokens = generate(gpt, LABELS, 2.0, generator=g, head_steps=4)
    assert tokens.shape == (3, N, 16)
    assert torch.equal(tok.decode(tokens, num_tokens=N, guidance=1.5, generator=g), default)


@pytest.mark.parametrize("k", [1, 2])
def test_first_k_tokens_take_k_ar_steps_and_decode_as_a_prefix_reconstruction(models, k, monkeypatch):
    gpt, tok = models
    g = torch.Generator().manual_seed(0)
    full = generate(gpt, LABELS, 2.0, generator=g, head_steps=4)
    calls = {"ar": 0, "head": 0}

    def counted(name, fn):
        def call(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(gpt, "forward", counted("ar", gpt.forward))
    monkeypatch.setattr(gpt.diffloss, "sample", counted("head", gpt.diffloss.sample))
    g = torch.Generator().manual_seed(0)
    prefix = generate(gpt, LABELS, 2.0, generator=g, head_steps=4, num_tokens=k)
    after_tokens = g.get_state()  # where the decoder's noise starts
    assert calls == {"ar": k, "head": k}  # k AR steps, not N
    assert prefix.shape == (3, k, 16)
    torch.testing.assert_close(prefix, full[:, :k])  # the first k tokens of the full draw
    calls.update(ar=0, head=0)
    images = draw(models, tokens=k)
    assert calls == {"ar": k, "head": k}
    monkeypatch.undo()
    # Decoded as a reconstruction from the first k tokens decodes: all N given, the slots from k on nulled.
    g = torch.Generator().set_state(after_tokens)
    as_reconstruction = tok.decode(full, num_tokens=k, guidance=1.5, generator=g)
    torch.testing.assert_close(images, as_reconstruction)
    g = torch.Generator().set_state(after_tokens)
    assert (tok.decode(full, num_tokens=N, guidance=1.5, generator=g) - images).abs().max() > 1e-2  # it matters


def test_a_k_outside_1_to_n_fails_with_the_fix(models):
    for k in (0, N + 1):
        with pytest.raises(ValueError, match=rf"--tokens / sample.tokens {k}: the AR model draws {N} tokens, so k "
                                             rf"must be in 1\.\.{N}"):
            draw(models, tokens=k)
    with pytest.raises(ValueError, match="unknown sampling settings \\['cfg'\\]"):
        EagerSampler(LoadedGenerator(models[0], SampleConfig(), None, None, Path("ar")), models[1]).resolved(cfg=2.0)
    with pytest.raises(ConfigError, match="sample.tokens"):
        from_dict(SampleConfig, {"tokens": 0}, prefix="sample.")
    assert from_dict(SampleConfig, {"tokens": 2}, prefix="sample.").tokens == 2


def test_cli_options_are_the_sample_settings(capsys):
    """Every SampleConfig field is an option of sample, export and eval gen (none is spelled out twice)."""
    parser = build_parser()
    flags = {"tokens": "2", "head_steps": "3", "guidance": "2.5", "guidance_schedule": "constant",
             "temperature": "0.5", "sampler": "ode", "decoder_guidance": "1.5", "decoder_steps": "euler2"}
    assert set(flags) == set(SETTINGS) == {o.name for o in sample_options()}
    given = [x for name, value in flags.items() for x in ("--" + name.replace("_", "-"), value)]
    for command in (["sample", "ckpt"], ["export", "ckpt", "--out", "x"], ["eval", "gen", "ckpt"]):
        args = parser.parse_args(command + given)
        assert {name: getattr(args, name) for name in SETTINGS} == {
            "tokens": 2, "head_steps": 3, "guidance": 2.5, "guidance_schedule": "constant", "temperature": 0.5,
            "sampler": "ode", "decoder_guidance": 1.5, "decoder_steps": "euler2"}
    assert parser.parse_args(["sample", "ckpt", "--cfg", "3"]).guidance == 3.0  # the older spelling
    with pytest.raises(SystemExit) as exit:
        parser.parse_args(["sample", "ckpt", "--tokens", "0"])
    assert exit.value.code == 2 and "--tokens must be at least 1, got 0" in capsys.readouterr().err


def test_an_ar_run_whose_previews_ask_for_more_tokens_than_its_model_draws_is_refused(tmp_path):
    from semanticist_fast.config import load_config
    from semanticist_fast.tasks.autoregressive_stage import ARRun, build

    run = load_config(ARRun, "configs/autoregressive_tiny.yaml", ["sample.tokens=9"])
    with pytest.raises(ConfigError, match=r"sample.tokens 9: the AR model draws 8 tokens, so k must be in 1\.\.8"):
        build(run, tmp_path, torch.device("cpu"))
