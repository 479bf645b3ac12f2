"""The AR token cache: exact read-back, stale caches refused, interrupted builds resumed, views without replacement."""

import numpy as np
import pytest
import torch

from helpers import micro_tokenizer_run
from semanticist_fast.common.runs import write_weights_file
from semanticist_fast.config import to_dict
from semanticist_fast.data.procedural import ProceduralImages
from semanticist_fast.data.token_cache import TokenCache, build_token_cache, image_views
from semanticist_fast.models.tokenizer import SemanticistTokenizer
from semanticist_fast.inference import Tokenizer

N_TOKENS = 3
DESC = {"dataset": "procedural", "test": True}


def save_tokenizer(path, seed=0):
    torch.manual_seed(seed)
    run = micro_tokenizer_run()
    model = SemanticistTokenizer(run.model)
    write_weights_file(path, model.state_dict(), "tokenizer", to_dict(run))
    return path


@pytest.fixture
def setup(tmp_path):
    ckpt = save_tokenizer(tmp_path / "tok.safetensors")
    tok = Tokenizer.from_checkpoint(ckpt, device="cpu")
    data = ProceduralImages(16, 20, split="train", num_classes=5)
    return tmp_path, ckpt, tok, data


def build(tok, ckpt, data, cache, **kw):
    args = dict(num_tokens=N_TOKENS, views="center_flip", data_desc=DESC, shard_size=8, batch_size=16, progress=False)
    args.update(kw)
    return build_token_cache(tok, ckpt, data, cache, **args)


def test_read_back_is_bit_exact(setup):
    tmp, ckpt, tok, data = setup
    cache = TokenCache(build(tok, ckpt, data, tmp / "cache"))
    assert len(cache) == 20 and cache.num_views == 2
    for shard_start in range(0, 20, 8):
        idx = range(shard_start, min(20, shard_start + 8))
        # The same batch the build encoded (one shard per batch here), so the same fp32 arithmetic.
        views = torch.cat([image_views(data[i][0], "center_flip", 16) for i in idx])
        expected = tok.model.encode(views)[:, :N_TOKENS].detach().half().float().reshape(len(idx), 2, N_TOKENS, -1)
        for j, i in enumerate(idx):
            for v in range(2):
                assert torch.equal(cache.read(i, v), expected[j, v])
            assert int(cache.labels[i]) == data[i][1]


def test_stale_cache_is_rejected_with_the_reason(setup):
    tmp, ckpt, tok, data = setup
    build(tok, ckpt, data, tmp / "cache")
    with pytest.raises(ValueError, match="num_tokens"):
        build(tok, ckpt, data, tmp / "cache", num_tokens=N_TOKENS + 1)
    with pytest.raises(ValueError, match="views"):
        build(tok, ckpt, data, tmp / "cache", views="center")
    other = save_tokenizer(tmp / "other.safetensors", seed=1)
    with pytest.raises(ValueError, match="tokenizer_sha256"):
        build(Tokenizer.from_checkpoint(other, device="cpu"), other, data, tmp / "cache")
    build(tok, ckpt, data, tmp / "cache")  # the matching run still reuses it


def test_interrupted_build_resumes(setup):
    tmp, ckpt, tok, data = setup
    whole = build(tok, ckpt, data, tmp / "whole")
    part = build(tok, ckpt, data, tmp / "part", stop_after_shards=1)
    assert sorted(p.name for p in part.glob("shard-*.json")) == ["shard-00000.json"]  # the record marks it done
    with pytest.raises(ValueError, match="incomplete"):
        TokenCache(part)
    first_shard = (part / "tokens-00000.npy").stat().st_mtime_ns
    build(tok, ckpt, data, tmp / "part")
    assert (part / "tokens-00000.npy").stat().st_mtime_ns == first_shard  # done work is not redone
    for s in range(3):
        for name in ("tokens", "labels"):
            assert np.array_equal(np.load(whole / f"{name}-{s:05d}.npy"), np.load(part / f"{name}-{s:05d}.npy"))


def test_views_are_drawn_without_replacement_across_epochs(setup):
    tmp, ckpt, tok, data = setup
    cache = TokenCache(build(tok, ckpt, data, tmp / "cache"), seed=3)
    for i in range(len(cache)):
        first_cycle = [cache.view_for(i, e) for e in range(cache.num_views)]
        assert sorted(first_cycle) == list(range(cache.num_views))
    cache.set_epoch(1)
    a = cache[4][0]
    assert torch.equal(a, cache.read(4, cache.view_for(4, 1)))
    assert TokenCache(cache.dir, seed=3).view_for(4, 1) == cache.view_for(4, 1)  # seeded


def test_ranks_build_disjoint_shards_of_one_cache(setup):
    """Two ranks build a cache together (rank r takes shards r, r + 2, ...): the same cache one builds alone."""
    tmp, ckpt, tok, data = setup
    whole = build(tok, ckpt, data, tmp / "whole")
    shared = tmp / "shared"
    build(tok, ckpt, data, shared, rank=1, world_size=2)
    assert sorted(p.name for p in shared.glob("shard-*.json")) == ["shard-00001.json"]
    build(tok, ckpt, data, shared, rank=0, world_size=2)
    a, b = TokenCache(whole), TokenCache(shared)
    for i in range(len(a)):
        assert torch.equal(a.read(i, 1), b.read(i, 1)) and a.labels[i] == b.labels[i]
