"""The two small experiments that tell a tokenizer that learns from one that paints the mean colour.

1. The decoder alone, on fixed informative tokens (a random projection of a 4x4 average-pooled image): it must read
   them, beating both its own all-null decode and the flat mean-colour image by a margin.
2. The encoder, trained with the decoder: a linear read-out of the pixels from its tokens, fitted on training
   images, must beat the flat image on held-out ones: the tokens carry more than colour.
Both use the tiny recipe's decoder (flow objective, linear slot path) and encoder settings at 16 px.
"""
import torch
import torch.nn.functional as F

from helpers import micro_tokenizer_run
from semanticist_fast.data.procedural import ProceduralImages
from semanticist_fast.engine.optimizer import build_adamw
from semanticist_fast.eval.metrics import flat_images, psnr
from semanticist_fast.inference import Tokenizer
from semanticist_fast.models.latent_codec import PixelCodec
from semanticist_fast.models.tokenizer import SemanticistTokenizer, build_decoder_process
from semanticist_fast.tasks import train

SIZE, SLOTS = 16, 4
RECIPE = (f"model.image_size={SIZE}", f"model.encoder.num_slots={SLOTS}", "model.encoder.dim=64",
          "model.encoder.depth=2", "model.encoder.heads=4", "model.encoder.patch_size=4",
          "model.decoder.depth=2", "model.decoder.hidden=64", "model.decoder.heads=4", "model.decoder.patch_size=2")


def images(split: str, n: int) -> torch.Tensor:
    data = ProceduralImages(SIZE, n, split=split)
    return torch.stack([data[i][0] for i in range(n)])


def informative_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, SLOTS, 16) standardised tokens that hold a 4x4 average-pooled image (48 numbers) in 64."""
    projection = torch.randn(48, SLOTS * 16, generator=torch.Generator().manual_seed(0)) / 48 ** 0.5
    t = (F.adaptive_avg_pool2d(x * 2 - 1, 4).flatten(1) @ projection).view(-1, SLOTS, 16)
    return (t - t.mean(-1, keepdim=True)) / (t.std(-1, keepdim=True) + 1e-6)


def test_decoder_reads_fixed_informative_tokens(one_thread):
    torch.manual_seed(0)
    model = SemanticistTokenizer(micro_tokenizer_run(*RECIPE).model)
    process = build_decoder_process(model.cfg)
    optimizer = build_adamw(model.dit, 2e-3, (0.9, 0.95), 0.0)
    train_images = images("train", 2048)
    for step in range(400):
        x = train_images[torch.randint(0, len(train_images), (32,))]
        keep = torch.where(torch.rand(32) < 0.1, 0, SLOTS)  # the all-null condition trains too
        tokens = informative_tokens(x)
        loss = process.training_losses(lambda x_t, t: model.dit(x_t, t, tokens, keep), x * 2 - 1)["loss"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    tok = Tokenizer(model, PixelCodec())
    val = images("val", 128)
    tokens = informative_tokens(val)
    read = psnr(tok.decode(tokens, generator=torch.Generator().manual_seed(1)), val).mean().item()
    null = psnr(tok.decode(tokens, num_tokens=0, generator=torch.Generator().manual_seed(1)), val).mean().item()
    flat = psnr(flat_images(val), val).mean().item()
    assert read > flat + 1.0, (read, flat)
    assert read > null + 3.0, (read, null)


def ridge_readout_psnr(tokens_train, x_train, tokens_val, x_val) -> float:
    """PSNR of the best linear map (ridge) from tokens to pixels, fitted on train, scored on val."""
    a = torch.cat([tokens_train.flatten(1), torch.ones(len(tokens_train), 1)], 1).double()
    b = torch.cat([tokens_val.flatten(1), torch.ones(len(tokens_val), 1)], 1).double()
    w = torch.linalg.solve(a.T @ a + 1e-2 * torch.eye(a.shape[1], dtype=a.dtype), a.T @ x_train.flatten(1).double())
    return psnr((b @ w).float().view_as(x_val).clamp(0, 1), x_val).mean().item()


def test_encoder_tokens_carry_more_than_colour(tmp_path):
    run = micro_tokenizer_run(*RECIPE, "data.num_items=4096", "data.num_val_items=256", "train.batch_size=32",
                              "train.epochs=4", "train.log_every=32", "train.ckpt_every=512", "optim.lr=2e-3",
                              "optim.warmup_epochs=0.25", "train.ema_decay=0.99", "model.nested.enable_nest_after=50")
    train(run, tmp_path)
    tok = Tokenizer.from_checkpoint(tmp_path, device="cpu")
    x_train, x_val = images("train", 2048), images("val", 256)
    readout = ridge_readout_psnr(tok.encode(x_train), x_train, tok.encode(x_val), x_val)
    first_token = ridge_readout_psnr(tok.encode(x_train)[:, :1], x_train, tok.encode(x_val)[:, :1], x_val)
    flat = psnr(flat_images(x_val), x_val).mean().item()
    assert readout > flat + 1.0, (readout, flat)
    assert readout > first_token + 0.5, (readout, first_token)  # the later tokens add to the first
