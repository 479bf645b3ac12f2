"""Tokenizer.decode(samples=M): the mean of M draws from the decoder, the posterior-mean reconstruction.

Held to a plain reference: M single-draw decodes taken one after another from one generator, averaged."""
import pytest
import torch

from helpers import micro_tokenizer_run, randomized
from semanticist_fast.eval.reconstruction import as_scored, chunk_generator, reconstruction_report
from semanticist_fast.inference import Tokenizer
from semanticist_fast.models.latent_codec import PixelCodec
from semanticist_fast.models.tokenizer import SemanticistTokenizer


@pytest.fixture(scope="module")
def tok():
    torch.manual_seed(0)
    return Tokenizer(randomized(SemanticistTokenizer(micro_tokenizer_run().model)), PixelCodec(), "cpu")


# euler2 draws only the start noise; "2" (DDPM ancestral) also draws noise at every step from the same generator
@pytest.mark.parametrize("objective,steps", [("flow", "euler2"), ("ddpm", "2")])
def test_mean_of_draws_matches_averaged_single_draws(objective, steps):
    extra = [] if objective == "flow" else ["model.diffusion.objective=ddpm", "model.decoder.learn_sigma=true",
                                                  "model.diffusion.sample_steps=2"]
    torch.manual_seed(0)
    tok = Tokenizer(randomized(SemanticistTokenizer(micro_tokenizer_run(*extra).model)), PixelCodec(), "cpu")
    images = torch.rand(3, 3, tok.image_size, tok.image_size, generator=torch.Generator().manual_seed(1))
    tokens = tok.encode(images)
    shared = torch.Generator().manual_seed(7)
    draws = [tok.decode(tokens, num_tokens=2, steps=steps, generator=shared) for _ in range(3)]
    mean = tok.decode(tokens, num_tokens=2, steps=steps, generator=torch.Generator().manual_seed(7), samples=3)
    torch.testing.assert_close(mean, torch.stack(draws).mean(0), rtol=1e-6, atol=1e-6)
    assert (draws[0] - draws[1]).abs().max() > 1e-3  # the draws differ, so the mean is not just one of them
    single = tok.decode(tokens, num_tokens=2, steps=steps, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(single, draws[0], rtol=0, atol=0)  # samples=1 is the published single draw


def test_report_decodes_the_mean_and_says_so(tok):
    images = torch.rand(4, 3, tok.image_size, tok.image_size, generator=torch.Generator().manual_seed(2))
    report, recs = reconstruction_report(tok, images, [1, tok.num_slots], seed=3, samples=2)
    assert report["samples"] == 2
    # the one scoring pipeline: 8-bit originals in, chunk 0's decoder noise of seed 3 (eval/reconstruction.py)
    expected = tok.decode(tok.encode(as_scored(images)), num_tokens=1, generator=chunk_generator(tok.device, 3, 0),
                          samples=2)
    torch.testing.assert_close(recs[1], expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="samples must be >= 1"):
        tok.decode(tok.encode(images), samples=0)
